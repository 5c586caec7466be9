/* Connection tracking: one LRU hash for every endpoint of the node.
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

/* Fragments: the first fragment carries the ports; later ones find them here by IP id. */
struct frag_key {
	__u32 saddr;              /* 0 */
	__u32 daddr;              /* 4 */
	__u16 id;                 /* 8: IP identification */
	__u8  proto;              /* 10 */
	__u8  pad;                /* 11 */
};                            /* 12 bytes */

struct frag_ports {
	__u16 sport;              /* 0 */
	__u16 dport;              /* 2 */
};                            /* 4 bytes */

BPF_TABLE_PINNED("lru_hash", struct frag_key, struct frag_ports, frag_map, 8192, PIN_DIR "/frag");

#endif /* __MESH_CONNTRACK_H */
