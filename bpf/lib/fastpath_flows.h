/* Per-socket state of the socket fast path (lib/sockmap.h), in its own header because TC
 * (bpf/policy.c) writes it too: when conntrack re-checks a connection after a policy change and
 * the allow stands, the endpoint's hook confirms that endpoint's socket (fastpath_confirm), and
 * fastpath_msg lets the connection back on the fast path once both of its sides are confirmed.
 *
 *   fastpath_flows   sock_key -> fastpath_flow, LRU (entries of closed sockets age out).
 *
 * Which side confirms what: a socket in an endpoint is confirmed by that endpoint's TC hook (its
 * egress policy as a client, its ingress policy as a server; for a connection from the L7
 * processor, the client's egress too: lib/policy.h policy_can_access_proxied). A socket in the
 * node's namespace (the L7 processor) has no hook and no policy of its own (FP_FLOW_NODE_SIDE), and
 * a loopback pair inside an endpoint (key.netns set) never crosses TC: neither needs confirming.
 */
#ifndef __MESH_FASTPATH_FLOWS_H
#define __MESH_FASTPATH_FLOWS_H

#include <uapi/linux/bpf.h>

#ifndef FASTPATH_FLOW_MAP_SIZE
#define FASTPATH_FLOW_MAP_SIZE 131072 /* agent/datapath/redirect.py MAP_SIZES */
#endif

/* One end of a connection as seen from its own socket. */
struct sock_key {
	__u32 local_ip;           /*  0: network order */
	__u32 remote_ip;          /*  4: network order */
	__u16 local_port;         /*  8: host order */
	__u16 remote_port;        /* 10: host order */
	__u32 pad;                /* 12 */
	__u64 netns;              /* 16: namespace cookie for loopback pairs, else 0 */
};                            /* 24 bytes */

#define FP_FLOW_TCP_FOR_GOOD 0x1 /* retired (set by older builds): this socket stays on TCP */
#define FP_FLOW_ON_TCP       0x2 /* on the TCP path until the peer has read all of it */
#define FP_FLOW_NODE_SIDE    0x4 /* in the node's namespace: no TC hook, nothing to confirm */

struct fastpath_flow {
	__u32 revision;           /*  0: the policy_revision this side was last admitted at */
	__u32 flags;              /*  4: FP_FLOW_* */
	__u64 sk;                 /*  8: the socket's struct sock, for its peer to read its queue */
};                            /* 16 bytes */

/* Larger than the sockhash: closed sockets' entries linger until evicted, and the LRU's per-CPU
 * free lists evict early when they run short. */
BPF_TABLE_PINNED("lru_hash", struct sock_key, struct fastpath_flow, fastpath_flows, FASTPATH_FLOW_MAP_SIZE,
		 PIN_DIR "/fastpath_flows");

/* Is this side admitted at @revision? */
static __always_inline int fastpath_admitted(const struct sock_key *key, const struct fastpath_flow *flow,
					     __u32 revision)
{
	return key->netns || (flow->flags & FP_FLOW_NODE_SIDE) || flow->revision == revision;
}

/**
 * fastpath_confirm - TC re-checked a TCP connection of the endpoint at @ep_ip at @revision, and it stands
 * @saddr, @daddr, @sport, @dport: the packet's (addresses network order, ports host order)
 *
 * The endpoint's own socket of the connection is the end whose local address is @ep_ip. Called
 * once per connection and policy change (when conntrack's revision moves), not per packet.
 */
static __always_inline void fastpath_confirm(__u32 ep_ip, __u32 saddr, __u32 daddr, __u16 sport, __u16 dport,
					     __u32 revision)
{
	struct sock_key key = {};
	struct fastpath_flow *flow;

	if (saddr == ep_ip) {
		key.local_ip = saddr;
		key.remote_ip = daddr;
		key.local_port = sport;
		key.remote_port = dport;
	} else {
		key.local_ip = daddr;
		key.remote_ip = saddr;
		key.local_port = dport;
		key.remote_port = sport;
	}
	flow = fastpath_flows.lookup(&key);
	if (flow)
		flow->revision = revision;
}

#endif /* __MESH_FASTPATH_FLOWS_H */
