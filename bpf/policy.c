/* L3/L4 identity policy for endpoints: TC programs on each endpoint's host-side veth.
 *
 *   from_container  TC ingress of the host-side veth: packets the endpoint sends (its egress)
 *   to_container    TC egress of the host-side veth: packets delivered to the endpoint (its ingress)
 *
 * Both run the same steps: find the endpoint by ifindex, parse IPv4 and L4, anti-spoofing (egress),
 * conntrack, and for the first packet of a flow the policy decision. Every verdict that is
 * reported goes through send_flow_event() (bpf/lib/events.h).
 *
 * The node's L7 processor: an endpoint's new TCP flow to it (datapath_config.proxy_ip/port) is a
 * redirect, admitted without the egress policy (VERDICT_REDIRECTED); a flow the processor opens to
 * an endpoint on a client's behalf carries the client endpoint's id in its mark, and both the
 * client's egress policy and the backend's ingress policy decide it, as if the client had
 * connected to the backend itself (lib/common.h, MARK_MAGIC_PROXY_EGRESS). Both are checked only
 * for a flow's first packet and on policy re-checks: established flows cost what they did.
 */
#include "lib/common.h"
#include "lib/drop_reasons.h"
#include "lib/ipcache.h"
#include "lib/policy.h"
#include "lib/conntrack.h"
#include "lib/events.h"
#include "lib/fastpath_flows.h"

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04

#define ICMP_ECHOREPLY 0
#define ICMP_ECHO      8

#define IP_MF     0x2000
#define IP_OFFSET 0x1fff

/* What the parser learned about a packet. */
struct pkt {
	__u32 saddr, daddr;       /* network order */
	__u16 sport, dport;       /* host order: conntrack tuple */
	__u16 policy_port;        /* port the policy looks at: dport, or the ICMP type */
	__u8  proto;
	__u8  tcp_flags;
	__u32 len;
};

static __always_inline int drop(struct __sk_buff *skb, struct endpoint_info *ep, __u8 dir,
				struct pkt *p, __u8 reason, __u32 rule_id, __u32 remote, __u8 is_reply)
{
	struct flow_event ev = {
		.saddr = p->saddr, .daddr = p->daddr, .sport = p->sport, .dport = p->dport,
		.proto = p->proto, .type = EVENT_DROP, .verdict = VERDICT_DROPPED, .dir = dir,
		.drop_reason = reason, .is_reply = is_reply, .tcp_flags = p->tcp_flags,
		.ifindex = skb->ifindex, .rule_id = rule_id,
	};

	if (ep) {
		ev.ep_id = ep->ep_id;
		ev.src_identity = dir == DIR_EGRESS ? ep->identity : remote;
		ev.dst_identity = dir == DIR_EGRESS ? remote : ep->identity;
	}
	update_metrics(reason, dir, skb->len);
	send_flow_event(&ev);
	return TC_ACT_SHOT;
}

/* Copy a header at @off into @dst: straight from the linear packet data when it is all there
 * (the common case; no helper call), else through bpf_skb_load_bytes() for non-linear skbs.
 * Evaluates to 0 or a negative error. A macro so the copy size is a compile-time constant. */
#define load_header(skb, off, dst) ({						\
	void *__data = (void *)(long)(skb)->data;				\
	void *__end = (void *)(long)(skb)->data_end;				\
	int __ret = 0;								\
	if (__data + (off) + sizeof(*(dst)) <= __end)				\
		__builtin_memcpy((dst), __data + (off), sizeof(*(dst)));	\
	else									\
		__ret = bpf_skb_load_bytes((skb), (off), (dst), sizeof(*(dst)));\
	__ret;									\
})

/* Parse IPv4 and the L4 ports. Returns 0 or a DROP_* reason. Headers are copied to the stack
 * (load_header), so no packet pointer outlives a helper call and nothing needs revalidation. */
static __always_inline int parse_ipv4(struct __sk_buff *skb, struct pkt *p)
{
	struct iphdr ip;
	__u32 l4_off;
	__u16 frag;

	if (load_header(skb, ETH_HLEN, &ip) < 0)
		return DROP_INVALID;
	if (ip.version != 4 || ip.ihl < 5)
		return DROP_INVALID;

	p->saddr = ip.saddr;
	p->daddr = ip.daddr;
	p->proto = ip.protocol;
	p->len = skb->len;
	p->sport = p->dport = p->policy_port = 0;
	p->tcp_flags = 0;
	l4_off = ETH_HLEN + ip.ihl * 4;
	frag = bpf_ntohs(ip.frag_off);

	if (frag & IP_OFFSET) {
		/* A later fragment: no L4 header; take the ports its first fragment recorded. */
		struct frag_key fk = { .saddr = ip.saddr, .daddr = ip.daddr, .id = ip.id, .proto = ip.protocol };
		struct frag_ports *fp = frag_map.lookup(&fk);

		if (!fp)
			return DROP_FRAG_NOT_FOUND;
		p->sport = fp->sport;
		p->dport = fp->dport;
		p->policy_port = fp->dport;
		return 0;
	}

	switch (ip.protocol) {
	case IPPROTO_TCP: {
		__u8 hdr[14]; /* ports (4), seq (4), ack (4), data offset (1), flags (1) */

		if (load_header(skb, l4_off, &hdr) < 0)
			return DROP_CT_INVALID_HDR;
		if ((hdr[12] >> 4) < 5)
			return DROP_CT_INVALID_HDR;
		p->sport = (hdr[0] << 8) | hdr[1];
		p->dport = (hdr[2] << 8) | hdr[3];
		p->tcp_flags = hdr[13];
		p->policy_port = p->dport;
		break;
	}
	case IPPROTO_UDP:
	case IPPROTO_SCTP: {
		__u8 ports[4];

		if (load_header(skb, l4_off, &ports) < 0)
			return DROP_CT_INVALID_HDR;
		p->sport = (ports[0] << 8) | ports[1];
		p->dport = (ports[2] << 8) | ports[3];
		p->policy_port = p->dport;
		break;
	}
	case IPPROTO_ICMP: {
		__u8 icmp[8]; /* type, code, checksum, id, sequence */

		if (load_header(skb, l4_off, &icmp) < 0)
			return DROP_CT_INVALID_HDR;
		p->policy_port = icmp[0];
		if (icmp[0] == ICMP_ECHO || icmp[0] == ICMP_ECHOREPLY) {
			/* Request and reply carry the same id: use it as both ports so the reversed
			 * tuple of a reply finds the request's entry. */
			p->sport = p->dport = (icmp[4] << 8) | icmp[5];
		} else {
			p->sport = icmp[0];
		}
		break;
	}
	default:
		/* Other protocols have no ports: policy sees them as (proto, port 0). */
		break;
	}

	if (frag & IP_MF) {
		struct frag_key fk = { .saddr = ip.saddr, .daddr = ip.daddr, .id = ip.id, .proto = ip.protocol };
		struct frag_ports fp = { .sport = p->sport, .dport = p->dport };

		frag_map.update(&fk, &fp);
	}
	return 0;
}

/* Flow counters are statistics: plain adds, not atomics. Two CPUs updating one flow at the same
 * moment can lose an increment; a locked add on every packet costs more than that is worth.
 * last_seen is in jiffies: reading the jiffies counter is a memory load, where ktime on a VM's
 * paravirtual clock cost about 40 ns a packet here. */
static __always_inline void ct_account(struct ct_entry *ct, struct pkt *p, int reply)
{
	ct->last_seen = bpf_jiffies64();
	if (reply) {
		ct->packets_rev += 1;
		ct->bytes_rev += p->len;
	} else {
		ct->packets_fwd += 1;
		ct->bytes_fwd += p->len;
	}
}

/* The port policy decided a tracked flow on: see parse_ipv4() for how ICMP fills the tuple. */
static __always_inline __u16 ct_policy_port(struct ct_key *key)
{
	if (key->proto != IPPROTO_ICMP)
		return key->dport;
	return key->sport == key->dport ? ICMP_ECHO : key->sport;
}

/* A TCP flow that closed is reported once, with its counters. */
static __always_inline void ct_track_close(struct __sk_buff *skb, struct endpoint_info *ep,
					   struct ct_key *key, struct ct_entry *ct, struct pkt *p,
					   int reply)
{
	__u8 flags = ct->flags;

	if (p->proto != IPPROTO_TCP || !(p->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST)))
		return;
	if (p->tcp_flags & TCP_FLAG_RST)
		flags |= CT_F_RST;
	if (p->tcp_flags & TCP_FLAG_FIN)
		flags |= reply ? CT_F_FIN_REV : CT_F_FIN_FWD;
	if (!(flags & CT_F_END_SENT) &&
	    ((flags & CT_F_RST) || (flags & (CT_F_FIN_FWD | CT_F_FIN_REV)) == (CT_F_FIN_FWD | CT_F_FIN_REV))) {
		struct flow_event ev = {
			.saddr = key->saddr, .daddr = key->daddr, .sport = key->sport, .dport = key->dport,
			.proto = key->proto, .type = EVENT_FLOW_END,
			.verdict = (ct->flags & CT_F_REDIRECT) ? VERDICT_REDIRECTED :
				   (ct->flags & CT_F_AUDIT) ? VERDICT_AUDIT : VERDICT_FORWARDED,
			.dir = key->dir, .tcp_flags = p->tcp_flags, .ep_id = ep->ep_id,
			.ifindex = skb->ifindex, .rule_id = ct->rule_id,
			.packets = ct->packets_fwd + ct->packets_rev,
			.bytes = ct->bytes_fwd + ct->bytes_rev,
		};

		ev.src_identity = key->dir == DIR_EGRESS ? ep->identity : ct->remote_identity;
		ev.dst_identity = key->dir == DIR_EGRESS ? ct->remote_identity : ep->identity;
		flags |= CT_F_END_SENT;
		send_flow_event(&ev);
	}
	ct->flags = flags;
}

/* A new flow from an endpoint to the node's L7 processor: the socket hooks of bpf/redirect.c sent
 * it there (an L7 service), or the endpoint dialled it itself, which the processor refuses since
 * it finds no original destination for the connection. */
static __always_inline int is_proxy_redirect(struct datapath_config *cfg, struct pkt *p)
{
	return cfg && cfg->proxy_ip && p->daddr == cfg->proxy_ip && p->proto == IPPROTO_TCP &&
	       p->dport == bpf_ntohs(cfg->proxy_port);
}

/**
 * ingress_remote - who sent a packet delivered to an endpoint
 * @skb:    the packet; its mark is read for packets from the host
 * @saddr:  its source address, network order
 * @remote: out: the sender's identity
 * @client: out: the local client endpoint the L7 processor forwards for, or NULL
 * @flags:  out: CT_F_PROXY_ID if the identity came from the L7 processor's mark
 *
 * The ipcache's identity of @saddr, except for a packet from a HOST address that carries a proxy
 * mark (lib/common.h): the L7 processor forwarding a client's connection, and the client is what
 * policy decides on. MARK_MAGIC_PROXY_EGRESS names a client endpoint of this node (@client, whose
 * identity is @remote); MARK_MAGIC_IDENTITY only an identity.
 *
 * Returns 0, or DROP_NO_ENDPOINT for a proxy mark that names no endpoint of this node (it left
 * since the client connected): such a flow fails closed rather than pass as the host.
 */
static __always_inline int ingress_remote(struct __sk_buff *skb, __u32 saddr, __u32 *remote,
					  struct endpoint_info **client, __u8 *flags)
{
	__u32 mark = skb->mark;

	*remote = ipcache_lookup_identity(saddr);
	*client = 0;
	if (*remote != IDENTITY_HOST)
		return 0;
	if ((mark & MARK_MAGIC_MASK) == MARK_MAGIC_IDENTITY && (mark & MARK_IDENTITY_MASK)) {
		*flags |= CT_F_PROXY_ID;
		*remote = mark & MARK_IDENTITY_MASK;
		return 0;
	}
	/* Bits 16..23 are zero in a proxy-egress mark: anything else is some other mark. */
	if ((mark & ~MARK_EP_ID_MASK) == MARK_MAGIC_PROXY_EGRESS && (mark & MARK_EP_ID_MASK)) {
		*client = lookup_endpoint_by_id(mark & MARK_EP_ID_MASK);
		if (!*client)
			return DROP_NO_ENDPOINT;
		*flags |= CT_F_PROXY_ID;
		*remote = (*client)->identity;
	}
	return 0;
}

static __always_inline int handle(struct __sk_buff *skb, __u8 dir)
{
	struct endpoint_info *ep, *client = 0;
	struct datapath_config *cfg;
	struct policy_result res = {};
	struct ct_entry *ct;
	struct ct_key key = {}, rkey = {};
	struct pkt p = {};
	__u32 ifindex = skb->ifindex, remote, revision;
	__u8 ct_flags = 0;
	int reply = 0, err;

	ep = lookup_endpoint(ifindex);
	if (skb->protocol == bpf_htons(ETH_P_ARP))
		return TC_ACT_OK;
	if (!ep) {
		/* Attached but not (or no longer) an endpoint: fail closed. */
		p.len = skb->len;
		return drop(skb, 0, dir, &p, DROP_NO_ENDPOINT, 0, 0, 0);
	}
	if (skb->protocol != bpf_htons(ETH_P_IP)) {
		p.len = skb->len;
		return drop(skb, ep, dir, &p, DROP_UNKNOWN_L3, 0, 0, 0);
	}
	err = parse_ipv4(skb, &p);
	if (err)
		return drop(skb, ep, dir, &p, err, 0, 0, 0);
	if (dir == DIR_EGRESS && p.saddr != ep->ip)
		return drop(skb, ep, dir, &p, DROP_INVALID_SIP, 0, 0, 0);

	key.saddr = p.saddr;
	key.daddr = p.daddr;
	key.sport = p.sport;
	key.dport = p.dport;
	key.proto = p.proto;
	key.dir = dir;
	key.ep_id = ep->ep_id;

	ct = ct_map.lookup(&key);
	if (!ct) {
		rkey.saddr = p.daddr;
		rkey.daddr = p.saddr;
		rkey.sport = p.dport;
		rkey.dport = p.sport;
		rkey.proto = p.proto;
		rkey.dir = dir ^ 1;
		rkey.ep_id = ep->ep_id;
		ct = ct_map.lookup(&rkey);
		reply = ct != 0;
	}

	cfg = datapath_config();
	revision = cfg ? cfg->policy_revision : 0;
	if (ct) {
		struct ct_key *orig = reply ? &rkey : &key;

		if (ct->revision != revision) {
			/* Policy changed since this flow was admitted: decide it again, as it was
			 * first seen, so a revoked allow cuts established flows too. A redirect to
			 * the L7 processor has no policy to re-check. The client of a flow the
			 * processor opened is the one its first packet's mark named (later packets,
			 * replies above all, carry none): its endpoint's current identity and egress
			 * policy, or the identity an identity-only mark gave. */
			if (!(ct->flags & CT_F_REDIRECT)) {
				__u8 by_client = 0;

				if ((ct->flags & CT_F_PROXY_ID) && ct->proxy_ep_id) {
					remote = ct->remote_identity;
					client = lookup_endpoint_by_id(ct->proxy_ep_id);
					if (!client) { /* the client endpoint left */
						ct_map.delete(orig);
						return drop(skb, ep, dir, &p, DROP_POLICY_REVOKED, 0, remote, reply);
					}
					remote = client->identity;
					by_client = policy_can_access_proxied(client, ep, orig->proto,
									      ct_policy_port(orig), &res) == DIR_EGRESS;
				} else {
					if (ct->flags & CT_F_PROXY_ID)
						remote = ct->remote_identity;
					else
						remote = ipcache_lookup_identity(orig->dir == DIR_EGRESS ? orig->daddr
													 : orig->saddr);
					policy_can_access(ep, orig->dir, remote, orig->proto, ct_policy_port(orig), &res);
				}
				if (res.verdict == VERDICT_DROPPED) {
					ct_map.delete(orig);
					/* The client's egress revoked it: report it as the client's, unless
					 * this is the backend's reply, whose addresses are the backend's. */
					if (by_client && !reply)
						return drop(skb, client, DIR_EGRESS, &p, DROP_POLICY_REVOKED, res.rule_id,
							    ep->identity, 0);
					return drop(skb, ep, dir, &p, DROP_POLICY_REVOKED, res.rule_id, remote, reply);
				}
				ct->rule_id = res.rule_id;
				ct->remote_identity = remote;
			}
			/* The allow stands: this endpoint's socket may take the fast path again. */
			if (orig->proto == IPPROTO_TCP)
				fastpath_confirm(ep->ip, p.saddr, p.daddr, p.sport, p.dport, revision);
			ct->revision = revision;
		}
		ct_account(ct, &p, reply);
		ct_track_close(skb, ep, orig, ct, &p, reply);
		update_metrics(REASON_FORWARDED, dir, skb->len);
		return TC_ACT_OK;
	}

	/* First packet of a flow. */
	if (dir == DIR_EGRESS) {
		remote = ipcache_lookup_identity(p.daddr);
		if (is_proxy_redirect(cfg, &p)) {
			/* The L7 processor picks the connection's real destination; this
			 * endpoint's egress policy decides on it there, on the processor's
			 * upstream flow (ingress_remote, MARK_MAGIC_PROXY_EGRESS). */
			res.verdict = VERDICT_REDIRECTED;
			ct_flags = CT_F_REDIRECT;
		} else {
			policy_can_access(ep, dir, remote, p.proto, p.policy_port, &res);
		}
	} else {
		err = ingress_remote(skb, p.saddr, &remote, &client, &ct_flags);
		if (err)
			return drop(skb, ep, dir, &p, err, 0, remote, 0);
		if (!client) {
			policy_can_access(ep, dir, remote, p.proto, p.policy_port, &res);
		} else if (policy_can_access_proxied(client, ep, p.proto, p.policy_port, &res) == DIR_EGRESS &&
			   res.verdict == VERDICT_DROPPED) {
			/* Reported as the client's egress drop, as a direct connection's would be:
			 * its endpoint, its deciding rule, the backend's identity as the peer. */
			return drop(skb, client, DIR_EGRESS, &p, DROP_POLICY_CLIENT_EGRESS, res.rule_id,
				    ep->identity, 0);
		}
	}
	if (res.verdict == VERDICT_DROPPED)
		return drop(skb, ep, dir, &p, res.drop_reason, res.rule_id, remote, 0);

	{
		struct ct_entry entry = {
			.rule_id = res.rule_id,
			.revision = revision,
			.remote_identity = remote,
			.flags = (res.verdict == VERDICT_AUDIT ? CT_F_AUDIT : 0) | ct_flags,
			.proxy_ep_id = client ? client->ep_id : 0,
		};
		struct flow_event ev = {
			.saddr = p.saddr, .daddr = p.daddr, .sport = p.sport, .dport = p.dport,
			.proto = p.proto, .type = EVENT_FLOW_NEW, .verdict = res.verdict, .dir = dir,
			.drop_reason = res.verdict == VERDICT_AUDIT ? res.drop_reason : 0,
			.tcp_flags = p.tcp_flags, .match = res.match, .ep_id = ep->ep_id,
			.ifindex = ifindex, .rule_id = res.rule_id,
			.packets = 1, .bytes = p.len,
		};

		entry.created_ns = bpf_ktime_get_ns();
		entry.last_seen = bpf_jiffies64();
		entry.packets_fwd = 1;
		entry.bytes_fwd = p.len;
		ct_map.update(&key, &entry);
		ev.src_identity = dir == DIR_EGRESS ? ep->identity : remote;
		ev.dst_identity = dir == DIR_EGRESS ? remote : ep->identity;
		send_flow_event(&ev);
	}
	update_metrics(REASON_FORWARDED, dir, skb->len);
	return TC_ACT_OK;
}

int from_container(struct __sk_buff *skb)
{
	return handle(skb, DIR_EGRESS);
}

int to_container(struct __sk_buff *skb)
{
	return handle(skb, DIR_INGRESS);
}
