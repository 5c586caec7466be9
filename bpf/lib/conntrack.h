/* Connection tracking: one LRU hash for every endpoint of the node, and its lookup, creation and
 * accounting (ct_lookup, ct_create, ct_account, ct_track_close, ct_delete).
 *
 * An entry is created when a flow's first packet passes policy at an endpoint, keyed by the tuple
 * in that packet's direction, the direction (DIR_*) and the endpoint. A later packet either matches
 * the key as it is (same direction as the first packet) or the reversed tuple with the opposite
 * direction (a reply). A flow between two local endpoints thus has two entries, one per endpoint,
 * each decided by that endpoint's own policy.
 *
 * Races: two CPUs may create the same entry for the first packets of one flow; the later update
 * wins and both decided with the same policy, so nothing is lost but a counter increment.
 */
#ifndef __MESH_CONNTRACK_H
#define __MESH_CONNTRACK_H

#include "common.h"
#include "ipv4.h"

#define CT_F_FIN_FWD   0x1 /* FIN seen in the original direction */
#define CT_F_FIN_REV   0x2 /* FIN seen in the reply direction */
#define CT_F_RST       0x4
#define CT_F_END_SENT  0x8 /* the flow-end event was emitted */
#define CT_F_AUDIT     0x10 /* admitted by an audit-mode policy */
#define CT_F_REDIRECT  0x20 /* a redirect to the node's L7 processor: egress policy is checked on
			     * the processor's upstream flow instead (MARK_MAGIC_PROXY_EGRESS) */
#define CT_F_PROXY_ID  0x40 /* remote_identity came from the L7 processor's mark: kept on re-checks,
			     * or taken again from proxy_ep_id's endpoint when that is set */

struct ct_key {
	__u32 saddr;              /*  0: network order, as in the flow's first packet */
	__u32 daddr;              /*  4 */
	__u16 sport;              /*  8: host order; ICMP echo: the echo id (both ports) */
	__u16 dport;              /* 10 */
	__u8  proto;              /* 12 */
	__u8  dir;                /* 13: DIR_* of the first packet, seen from the endpoint */
	__u16 ep_id;              /* 14 */
};                            /* 16 bytes */

struct ct_entry {
	__u64 created_ns;         /*  0: bpf_ktime_get_ns (CLOCK_MONOTONIC) */
	__u64 last_seen;          /*  8: bpf_jiffies64 */
	__u64 packets_fwd;        /* 16 */
	__u64 bytes_fwd;          /* 24 */
	__u64 packets_rev;        /* 32 */
	__u64 bytes_rev;          /* 40 */
	__u32 rule_id;            /* 48: the rule that admitted the flow */
	__u32 revision;           /* 52: policy revision the admission was decided at */
	__u32 remote_identity;    /* 56 */
	__u8  flags;              /* 60: CT_F_* */
	__u8  pad;                /* 61 */
	__u16 proxy_ep_id;        /* 62: CT_F_PROXY_ID: the client endpoint the L7 processor opened the
				   * flow for (MARK_MAGIC_PROXY_EGRESS), whose egress policy re-checks
				   * too; 0 = an identity-only mark. Was padding: older entries hold 0 */
};                            /* 64 bytes */

BPF_TABLE_PINNED("lru_hash", struct ct_key, struct ct_entry, ct_map, CT_MAP_SIZE, PIN_DIR "/ct");

/**
 * ct_lookup - find the entry of the flow a packet belongs to
 * @ep_id: the endpoint the program runs for
 * @dir:   DIR_* of the packet, seen from the endpoint
 * @p:     the parsed packet
 * @key:   out: the packet's own tuple, the key a new flow's entry is created under
 * @rkey:  out: the reversed tuple with the opposite direction; filled only if @key found nothing
 * @reply: out: 1 if the entry was found under @rkey (the packet is a reply), else 0
 *
 * Returns the entry, or NULL for the first packet of a flow.
 */
static __always_inline struct ct_entry *ct_lookup(__u16 ep_id, __u8 dir, struct pkt *p,
						  struct ct_key *key, struct ct_key *rkey, int *reply)
{
	struct ct_entry *ct;

	key->saddr = p->saddr;
	key->daddr = p->daddr;
	key->sport = p->sport;
	key->dport = p->dport;
	key->proto = p->proto;
	key->dir = dir;
	key->ep_id = ep_id;

	*reply = 0;
	ct = ct_map.lookup(key);
	if (ct)
		return ct;
	rkey->saddr = p->daddr;
	rkey->daddr = p->saddr;
	rkey->sport = p->dport;
	rkey->dport = p->sport;
	rkey->proto = p->proto;
	rkey->dir = dir ^ 1;
	rkey->ep_id = ep_id;
	ct = ct_map.lookup(rkey);
	*reply = ct != 0;
	return ct;
}

/**
 * ct_create - track a flow whose first packet @p passed policy
 * @key:         the packet's tuple (ct_lookup)
 * @p:           the packet, counted as the flow's first
 * @rule_id:     the rule that admitted the flow
 * @revision:    the policy revision it was decided at
 * @remote:      the peer's identity
 * @flags:       CT_F_* the entry starts with
 * @proxy_ep_id: with CT_F_PROXY_ID, the client endpoint the L7 processor opened the flow for
 */
static __always_inline void ct_create(struct ct_key *key, struct pkt *p, __u32 rule_id, __u32 revision,
				      __u32 remote, __u8 flags, __u16 proxy_ep_id)
{
	struct ct_entry entry = {
		.rule_id = rule_id,
		.revision = revision,
		.remote_identity = remote,
		.flags = flags,
		.proxy_ep_id = proxy_ep_id,
	};

	entry.created_ns = bpf_ktime_get_ns();
	entry.last_seen = bpf_jiffies64();
	entry.packets_fwd = 1;
	entry.bytes_fwd = p->len;
	ct_map.update(key, &entry);
}

/* Forget a flow: its policy was revoked. @key is the tuple it was created under. */
static __always_inline void ct_delete(struct ct_key *key)
{
	ct_map.delete(key);
}

/* Count @p on its flow's entry. Flow counters are statistics: plain adds, not atomics. Two CPUs
 * updating one flow at the same moment can lose an increment; a locked add on every packet costs
 * more than that is worth. last_seen is in jiffies: reading the jiffies counter is a memory load,
 * where ktime on a VM's paravirtual clock cost about 40 ns a packet here. */
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

/**
 * ct_track_close - note a TCP FIN or RST of a tracked flow
 * @ct:    the flow's entry
 * @p:     the packet
 * @reply: the packet goes in the reply direction
 *
 * A TCP flow is closed once RST was seen, or FIN both ways. Returns 1 the first time the flow is
 * closed (the caller then reports its end, once: CT_F_END_SENT is set here), else 0.
 */
static __always_inline int ct_track_close(struct ct_entry *ct, struct pkt *p, int reply)
{
	__u8 flags = ct->flags;
	int closed_now = 0;

	if (p->proto != IPPROTO_TCP || !(p->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST)))
		return 0;
	if (p->tcp_flags & TCP_FLAG_RST)
		flags |= CT_F_RST;
	if (p->tcp_flags & TCP_FLAG_FIN)
		flags |= reply ? CT_F_FIN_REV : CT_F_FIN_FWD;
	if (!(flags & CT_F_END_SENT) &&
	    ((flags & CT_F_RST) || (flags & (CT_F_FIN_FWD | CT_F_FIN_REV)) == (CT_F_FIN_FWD | CT_F_FIN_REV))) {
		flags |= CT_F_END_SENT;
		closed_now = 1;
	}
	ct->flags = flags;
	return closed_now;
}

/* The port policy decided a tracked flow on, from the tuple it was created under (parse_ipv4()
 * says how ICMP fills the tuple). */
static __always_inline __u16 ct_policy_port(struct ct_key *key)
{
	if (key->proto != IPPROTO_ICMP)
		return key->dport;
	return key->sport == key->dport ? ICMP_ECHO : key->sport;
}

#endif /* __MESH_CONNTRACK_H */
