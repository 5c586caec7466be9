/* Socket fast path: bytes written on one local TCP socket go straight into the receive queue of
 * its peer socket on the same node (sk_msg redirect), skipping both TCP stacks, the veths and TC.
 * Client <-> L7 processor, L7 processor <-> backend and endpoint <-> endpoint on one node.
 *
 *   fastpath_socks   sockhash: sock_key -> socket. The sockops program (bpf/redirect.c) adds both
 *                    ends of an eligible connection when it is established; the kernel removes a
 *                    socket when it closes. The fastpath_msg program runs on every sendmsg() of a
 *                    socket in this map.
 *   fastpath_flows   sock_key -> fastpath_flow: per-socket state, LRU (entries of closed sockets
 *                    age out).
 *   fastpath_config  one element: on/off, which namespaces and addresses are eligible.
 *   fastpath_metrics per-CPU messages and bytes by outcome (FP_*).
 *
 * Eligible: IPv4 TCP sockets whose namespace is one of this node's endpoints' (lib/netns.h) or the
 * node's own, with both addresses in the node's pod CIDR (endpoints and the router IP the L7
 * processor listens on); and loopback pairs inside an endpoint (then the namespace cookie is part
 * of the key: 127.0.0.1 exists in every namespace). Not loopback in the node's namespace: that is
 * usually the host's, and its other processes are not ours to accelerate.
 *
 * Falling back. A message that is not redirected (SK_PASS without a target) takes the normal TCP
 * path, which is always correct. Once a socket has sent anything on the TCP path it never
 * redirects again ("sticky"): redirected bytes land in the peer's queue at once, while bytes on
 * the TCP path may still be in flight (a veth backlog, a locked socket's backlog), so switching
 * from TCP to redirect could reorder the stream. The other way round is safe: the receiver reads
 * the redirected queue before its TCP receive queue (tcp_bpf_recvmsg). A socket falls back for
 * good when
 *   - its peer is not in the map (yet: a client that writes before the server's side of the
 *     handshake completed; or never: the peer is not eligible, or the map was full);
 *   - the policy revision changed since it was added: from then on its packets cross TC again and
 *     conntrack re-checks policy, so a revoked allow cuts it as it cuts any flow (lib/conntrack.h);
 *   - it wrote more than FASTPATH_UNREAD_BUDGET bytes since its peer last wrote back. A redirect
 *     into the peer's queue has no flow control: the kernel (6.1) charges it to the peer without
 *     checking its receive buffer, so a writer whose reader has stopped reading would queue
 *     without bound (measured: 512 MiB into a socket nobody reads). Request/response traffic
 *     resets the count with every answer and stays on the fast path; a one-way stream beyond the
 *     budget goes back to TCP, whose window stops the writer.
 *
 * Policy: the handshake of every connection crosses TC, so a flow that policy denies is never
 * established and never reaches this map. Bytes that take the fast path are not counted in flow
 * events (no packets exist); the flow's start and end are.
 */
#ifndef __MESH_SOCKMAP_H
#define __MESH_SOCKMAP_H

#include <uapi/linux/bpf.h>
#include "netns.h"
#include "config.h"

#ifndef FASTPATH_UNREAD_BUDGET
#define FASTPATH_UNREAD_BUDGET (4 << 20)
#endif

#define AF_INET_ 2 /* AF_INET; the socket headers are not available to BPF C */

/* One end of a connection as seen from its own socket. */
struct sock_key {
	__u32 local_ip;           /*  0: network order */
	__u32 remote_ip;          /*  4: network order */
	__u16 local_port;         /*  8: host order */
	__u16 remote_port;        /* 10: host order */
	__u32 pad;                /* 12 */
	__u64 netns;              /* 16: namespace cookie for loopback pairs, else 0 */
};                            /* 24 bytes */

/* BCC 0.26's BPF_SOCKHASH cannot pin, and BPF_TABLE_PINNED("sockhash", ...) declares no
 * sock_hash_update / msg_redirect_hash methods: this is BPF_SOCKHASH's declaration with the
 * "type:pin path" section name that BPF_TABLE_PINNED uses. */
struct fastpath_socks_table_t {
	struct sock_key key;
	int leaf;
	int (*update)(struct sock_key *, int *);
	int (*delete)(struct sock_key *);
	int (*sock_hash_update)(void *, void *, u64);
	int (*msg_redirect_hash)(void *, void *, u64);
	int (*sk_redirect_hash)(void *, void *, u64);
	u32 max_entries;
};
__attribute__((section("maps/sockhash:" PIN_DIR "/fastpath_socks")))
struct fastpath_socks_table_t fastpath_socks = { .max_entries = FASTPATH_MAP_SIZE };
BPF_ANNOTATE_KV_PAIR(fastpath_socks, struct sock_key, int);

#define FP_FLOW_FALLBACK 0x1 /* sticky: this socket sends on the TCP path from now on */

struct fastpath_flow {
	__u32 revision;           /*  0: policy_revision when the socket was added */
	__u32 flags;              /*  4: FP_FLOW_* */
	__u64 unread;             /*  8: bytes redirected since the peer last wrote back */
};                            /* 16 bytes */

/* Larger than the sockhash: closed sockets' entries linger until evicted, and the LRU's per-CPU
 * free lists evict early when they run short. */
BPF_TABLE_PINNED("lru_hash", struct sock_key, struct fastpath_flow, fastpath_flows, FASTPATH_FLOW_MAP_SIZE,
		 PIN_DIR "/fastpath_flows");

#define FP_CFG_ENABLED 0x1

/* Written by agent/datapath/redirect.py set_fastpath (mirrored by FastpathConfigC). */
struct fastpath_config {
	__u64 node_netns;         /*  0: the node's own namespace cookie (where the L7 processor runs) */
	__u32 pod_net;            /*  8: the node's pod CIDR, network order */
	__u32 pod_mask;           /* 12: its netmask, network order */
	__u32 flags;              /* 16: FP_CFG_* */
	__u32 pad;                /* 20 */
};                            /* 24 bytes */

BPF_TABLE_PINNED("array", __u32, struct fastpath_config, fastpath_config, 1, PIN_DIR "/fastpath_config");

/* Outcomes of fastpath_msg, the index into fastpath_metrics (mirrored in redirect.py). */
#define FP_REDIRECTED      0 /* handed to the peer socket */
#define FP_PASS_NO_PEER    1 /* fell back: the peer is not in the map */
#define FP_PASS_POLICY     2 /* fell back: the policy revision changed */
#define FP_PASS_UNREAD     3 /* fell back: FASTPATH_UNREAD_BUDGET exceeded */
#define FP_PASS_FALLEN     4 /* already fell back earlier */
#define FP_PASS_NO_STATE   5 /* fell back: no fastpath_flows entry (evicted, or the update failed) */
#define FP_OUTCOMES        6

struct fastpath_counter {
	__u64 messages;           /* 0 */
	__u64 bytes;              /* 8 */
};                            /* 16 bytes */

BPF_TABLE_PINNED("percpu_array", __u32, struct fastpath_counter, fastpath_metrics, FP_OUTCOMES,
		 PIN_DIR "/fastpath_metrics");

static __always_inline struct fastpath_config *fastpath_get_config(void)
{
	__u32 zero = 0;

	return fastpath_config.lookup(&zero);
}

static __always_inline int fastpath_in_pods(struct fastpath_config *cfg, __u32 ip)
{
	return (ip & cfg->pod_mask) == cfg->pod_net;
}

static __always_inline int fastpath_is_loopback(__u32 ip)
{
	return (bpf_ntohl(ip) >> 24) == 127;
}

static __always_inline void fastpath_count(__u32 outcome, __u32 bytes)
{
	struct fastpath_counter *c = fastpath_metrics.lookup(&outcome);

	if (c) {
		c->messages++; /* per CPU: no atomics needed */
		c->bytes += bytes;
	}
}

#endif /* __MESH_SOCKMAP_H */
