/* L3/L4 identity policy for endpoints: TC programs on each endpoint's host-side veth.
 *
 *   from_container  TC ingress of the host-side veth: packets the endpoint sends (its egress)
 *   to_container    TC egress of the host-side veth: packets delivered to the endpoint (its ingress)
 *
 * Both run the same steps (handle()): find the endpoint by ifindex, parse IPv4 and L4
 * (lib/ipv4.h), anti-spoofing (egress), conntrack lookup (lib/conntrack.h), the policy decision
 * (lib/policy.h) for the first packet of a flow or a re-check of a tracked one after a policy
 * change, conntrack creation or accounting, and the notification. There are two exits: a drop
 * ends in send_drop_notify() (lib/drop.h), a forwarded packet in send_trace_notify()
 * (lib/trace.h); each bumps the metrics and reports what is reported as a flow event.
 *
 * The node's L7 processor: an endpoint's new TCP flow to it (datapath_config.proxy_ip/port) is a
 * redirect, admitted without the egress policy (VERDICT_REDIRECTED); a flow the processor opens to
 * an endpoint on a client's behalf carries the client endpoint's id in its mark, and both the
 * client's egress policy and the backend's ingress policy decide it, as if the client had
 * connected to the backend itself (lib/common.h, MARK_MAGIC_PROXY_EGRESS). Both are checked only
 * for a flow's first packet and on policy re-checks: established flows cost what they did.
 *
 * The node's DNS proxy: an endpoint's new UDP or TCP flow to it (datapath_config.proxy_ip and
 * dns_port) is a redirect too, admitted without the egress policy (is_dns_redirect): the socket
 * hooks send every DNS query there (lib/dns.h), and the proxy decides what may be looked up.
 */
#include "lib/common.h"
#include "lib/drop_reasons.h"
#include "lib/ipv4.h"
#include "lib/ipcache.h"
#include "lib/policy.h"
#include "lib/conntrack.h"
#include "lib/events.h"
#include "lib/metrics.h"
#include "lib/drop.h"
#include "lib/trace.h"
#include "lib/fastpath_flows.h"

/* A new flow from an endpoint to the node's L7 processor: the socket hooks of bpf/redirect.c sent
 * it there (an L7 service), or the endpoint dialled it itself, which the processor refuses since
 * it finds no original destination for the connection. */
static __always_inline int is_proxy_redirect(struct datapath_config *cfg, struct pkt *p)
{
	return cfg && cfg->proxy_ip && p->daddr == cfg->proxy_ip && p->proto == IPPROTO_TCP &&
	       p->dport == bpf_ntohs(cfg->proxy_port);
}

/**
 * is_dns_redirect - a new flow from an endpoint to the node's DNS proxy
 * @cfg: the global config (the proxy's address and DNS port), or NULL
 * @p:   the parsed packet, sent by the endpoint (its source address was checked)
 *
 * The socket hooks sent the endpoint's query there (lib/dns.h), whatever resolver it asked for;
 * it passes whatever the endpoint's egress policy says, and the proxy decides: the DNS rules
 * (toPorts.rules.dns) say which names may be looked up, and an endpoint whose egress policy does
 * not allow DNS at all gets REFUSED. Why this opens nothing else: only the exact address and port
 * pass (UDP or TCP), only from an endpoint's own address, and whatever reaches them, a redirected
 * query or a packet crafted to that ip:port from a raw socket, reaches the DNS proxy and nothing
 * else, which holds it to the same rules. Replies are the flow's, tracked by conntrack.
 */
static __always_inline int is_dns_redirect(struct datapath_config *cfg, struct pkt *p)
{
	return cfg && cfg->proxy_ip && cfg->dns_port && p->daddr == cfg->proxy_ip &&
	       (p->proto == IPPROTO_UDP || p->proto == IPPROTO_TCP) && p->dport == bpf_ntohs(cfg->dns_port);
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

/**
 * policy_new_flow - the policy decision for the first packet of a flow
 * @skb:      the packet; its mark is read for packets delivered to the endpoint
 * @cfg:      the global config (the L7 processor's address), or NULL
 * @ep:       the endpoint the program runs for
 * @dir:      DIR_* of the packet, seen from @ep
 * @p:        the parsed packet
 * @res:      out: the decision (VERDICT_FORWARDED, VERDICT_AUDIT or VERDICT_REDIRECTED when 0 is
 *            returned)
 * @remote:   out: the peer's identity
 * @client:   out: the local client endpoint the L7 processor forwards for, or NULL
 * @ct_flags: out: CT_F_* the flow's conntrack entry starts with
 * @drop:     out: whose drop it is, when a drop reason is returned
 *
 * Returns 0 if the flow may start, else the DROP_* reason.
 */
static __always_inline int policy_new_flow(struct __sk_buff *skb, struct datapath_config *cfg,
					   struct endpoint_info *ep, __u8 dir, struct pkt *p,
					   struct policy_result *res, __u32 *remote,
					   struct endpoint_info **client, __u8 *ct_flags, struct drop_info *drop)
{
	int err;

	if (dir == DIR_EGRESS) {
		*remote = ipcache_lookup_identity(p->daddr);
		if (is_proxy_redirect(cfg, p) || is_dns_redirect(cfg, p)) {
			/* The L7 processor picks the connection's real destination; this
			 * endpoint's egress policy decides on it there, on the processor's
			 * upstream flow (ingress_remote, MARK_MAGIC_PROXY_EGRESS). The DNS
			 * proxy decides on the query (is_dns_redirect). */
			res->verdict = VERDICT_REDIRECTED;
			*ct_flags = CT_F_REDIRECT;
			return 0;
		}
		policy_can_access(ep, dir, *remote, p->daddr, p->proto, p->policy_port, res);
	} else {
		err = ingress_remote(skb, p->saddr, remote, client, ct_flags);
		if (err) {
			drop->remote = *remote;
			return err;
		}
		if (!*client) {
			/* An identity-only proxy mark: the packet's address is the proxy's, not the
			 * peer's, so no ipBlock can match it by address. */
			policy_can_access(ep, dir, *remote, (*ct_flags & CT_F_PROXY_ID) ? 0 : p->saddr, p->proto,
					  p->policy_port, res);
		} else if (policy_can_access_proxied(*client, ep, p->proto, p->policy_port, res) == DIR_EGRESS &&
			   res->verdict == VERDICT_DROPPED) {
			/* Reported as the client's egress drop, as a direct connection's would be:
			 * its endpoint, its deciding rule, the backend's identity as the peer. */
			drop->ep = *client;
			drop->dir = DIR_EGRESS;
			drop->remote = ep->identity;
			drop->rule_id = res->rule_id;
			return DROP_POLICY_CLIENT_EGRESS;
		}
	}
	if (res->verdict == VERDICT_DROPPED) {
		drop->remote = *remote;
		drop->rule_id = res->rule_id;
		return res->drop_reason;
	}
	return 0;
}

/**
 * policy_recheck - decide a tracked flow again: the policy changed since it was admitted
 * @ep:    the endpoint the program runs for
 * @ct:    the flow's conntrack entry; its rule and peer identity are updated if the allow stands
 * @orig:  the tuple the entry was created under: the flow as its first packet saw it
 * @reply: the packet goes in the reply direction
 * @drop:  out: whose drop it is, when a drop reason is returned
 *
 * The flow is decided as it was first seen, so a revoked allow cuts established flows too. A
 * redirect to the L7 processor has no policy to re-check. The client of a flow the processor
 * opened is the one its first packet's mark named (later packets, replies above all, carry none):
 * its endpoint's current identity and egress policy, or the identity an identity-only mark gave.
 *
 * Returns 0 if the allow stands, else DROP_POLICY_REVOKED (the entry is deleted).
 */
static __always_inline int policy_recheck(struct endpoint_info *ep, struct ct_entry *ct, struct ct_key *orig,
					  int reply, struct drop_info *drop)
{
	struct endpoint_info *client = 0;
	struct policy_result res = {};
	__u32 remote, addr = 0;
	__u8 by_client = 0;

	if (ct->flags & CT_F_REDIRECT)
		return 0;
	if ((ct->flags & CT_F_PROXY_ID) && ct->proxy_ep_id) {
		remote = ct->remote_identity;
		client = lookup_endpoint_by_id(ct->proxy_ep_id);
		if (!client) { /* the client endpoint left */
			ct_delete(orig);
			drop->remote = remote;
			drop->is_reply = reply;
			return DROP_POLICY_REVOKED;
		}
		remote = client->identity;
		by_client = policy_can_access_proxied(client, ep, orig->proto, ct_policy_port(orig), &res) == DIR_EGRESS;
	} else {
		if (ct->flags & CT_F_PROXY_ID) {
			remote = ct->remote_identity; /* an identity-only mark: no peer address */
		} else {
			addr = orig->dir == DIR_EGRESS ? orig->daddr : orig->saddr;
			remote = ipcache_lookup_identity(addr);
		}
		policy_can_access(ep, orig->dir, remote, addr, orig->proto, ct_policy_port(orig), &res);
	}
	if (res.verdict == VERDICT_DROPPED) {
		ct_delete(orig);
		drop->rule_id = res.rule_id;
		/* The client's egress revoked it: report it as the client's, unless this is the
		 * backend's reply, whose addresses are the backend's. */
		if (by_client && !reply) {
			drop->ep = client;
			drop->dir = DIR_EGRESS;
			drop->remote = ep->identity;
			return DROP_POLICY_REVOKED;
		}
		drop->remote = remote;
		drop->is_reply = reply;
		return DROP_POLICY_REVOKED;
	}
	ct->rule_id = res.rule_id;
	ct->remote_identity = remote;
	return 0;
}

static __always_inline int handle(struct __sk_buff *skb, __u8 dir)
{
	struct endpoint_info *ep, *client = 0;
	struct drop_info drop = { .dir = dir };
	struct datapath_config *cfg;
	struct policy_result res = {};
	struct ct_key key = {}, rkey = {}, *orig;
	struct ct_entry *ct;
	struct pkt p = {};
	__u32 remote, revision;
	__u8 ct_flags = 0;
	int reply, ret;

	if (skb->protocol == bpf_htons(ETH_P_ARP))
		return TC_ACT_OK;

	/* The endpoint: attached but not (or no longer) an endpoint fails closed. */
	ep = lookup_endpoint(skb->ifindex);
	if (!ep)
		return send_drop_notify(skb, &p, DROP_NO_ENDPOINT, &drop);
	drop.ep = ep;

	/* Parse, and anti-spoofing: an endpoint sends from its own address only. */
	ret = parse_ipv4(skb, &p);
	if (ret)
		return send_drop_notify(skb, &p, ret, &drop);
	if (dir == DIR_EGRESS && p.saddr != ep->ip)
		return send_drop_notify(skb, &p, DROP_INVALID_SIP, &drop);

	/* Conntrack lookup. */
	ct = ct_lookup(ep->ep_id, dir, &p, &key, &rkey, &reply);
	cfg = datapath_config();
	revision = cfg ? cfg->policy_revision : 0;

	if (ct) {
		/* A tracked flow: re-check its policy if that changed, then count the packet. */
		orig = reply ? &rkey : &key;
		if (ct->revision != revision) {
			ret = policy_recheck(ep, ct, orig, reply, &drop);
			if (ret)
				return send_drop_notify(skb, &p, ret, &drop);
			/* The allow stands: this endpoint's socket may take the fast path again. */
			if (orig->proto == IPPROTO_TCP)
				fastpath_confirm(ep->ip, p.saddr, p.daddr, p.sport, p.dport, revision);
			ct->revision = revision;
		}
		ct_account(ct, &p, reply);
		if (ct_track_close(ct, &p, reply))
			send_flow_end_notify(skb, ep, orig, ct, p.tcp_flags);
		return send_trace_notify(skb, dir);
	}

	/* The first packet of a flow: the policy decision, then track and report it. */
	ret = policy_new_flow(skb, cfg, ep, dir, &p, &res, &remote, &client, &ct_flags, &drop);
	if (ret)
		return send_drop_notify(skb, &p, ret, &drop);
	ct_create(&key, &p, res.rule_id, revision, remote,
		  (res.verdict == VERDICT_AUDIT ? CT_F_AUDIT : 0) | ct_flags, client ? client->ep_id : 0);
	send_flow_new_notify(skb, ep, dir, &p, &res, remote);
	return send_trace_notify(skb, dir);
}

int from_container(struct __sk_buff *skb)
{
	return handle(skb, DIR_EGRESS);
}

int to_container(struct __sk_buff *skb)
{
	return handle(skb, DIR_INGRESS);
}
