/* Socket fast path: bytes written on one local TCP socket go straight into the receive queue of
 * its peer socket on the same node (sk_msg redirect), skipping both TCP stacks, the veths and TC.
 * Client <-> L7 processor, L7 processor <-> backend and endpoint <-> endpoint on one node.
 *
 *   fastpath_socks   sockhash: sock_key -> socket. The sockops program (bpf/redirect.c) adds both
 *                    ends of an eligible connection when it is established; the kernel removes a
 *                    socket when it closes. The fastpath_msg program runs on every sendmsg() of a
 *                    socket in this map.
 *   fastpath_flows   per-socket state (lib/fastpath_flows.h: TC writes it too).
 *   fastpath_config  one element: on/off, which namespaces and addresses are eligible.
 *   fastpath_metrics per-CPU messages and bytes by outcome (FP_*).
 *
 * Eligible: IPv4 TCP sockets (AF_INET, or AF_INET6 with IPv4-mapped addresses) whose namespace is one of this node's endpoints' (lib/netns.h) or the
 * node's own, with both addresses in the node's pod CIDR (endpoints and the router IP the L7
 * processor listens on); and loopback pairs inside an endpoint (then the namespace cookie is part
 * of the key: 127.0.0.1 exists in every namespace). Not loopback in the node's namespace: that is
 * usually the host's, and its other processes are not ours to accelerate.
 *
 * Falling back. A message that is not redirected (SK_PASS without a target) takes the normal TCP
 * path, which is always correct. Redirect -> TCP is always safe: the receiver reads the redirected
 * queue before its TCP receive queue (tcp_bpf_recvmsg). TCP -> redirect is safe only once every
 * byte the socket gave TCP has been read by the peer's application (our write_seq == the peer's
 * copied_seq, fastpath_tcp_drained): bytes still in flight (a veth backlog, a locked socket's
 * backlog) or unread would be overtaken by the redirected ones. A socket goes to TCP until the
 * peer has caught up (FP_FLOW_ON_TCP) when
 *   - its peer is not in the map: a client that writes at once after connect() may do so before
 *     the server's side of the handshake has completed (iperf3 does, over veths); or the peer
 *     closed; or it is not eligible, or the map was full (sockets join only at establishment);
 *   - its peer has FASTPATH_QUEUE_BUDGET bytes queued that its application has not read. A
 *     redirect into the peer's queue has no flow control of its own: the kernel charges it to the
 *     peer without checking its receive buffer, so a writer whose reader stopped reading would
 *     queue without bound (measured: 512 MiB into a socket nobody reads). The peer's queue length
 *     is the kernel's own count, sk_psock.msg_tot_len, read through the peer's struct sock
 *     (fastpath_peer_queued below). A reader that keeps up keeps its writer on the fast path,
 *     one-way bulk included; one that falls behind sends the writer to TCP, whose window stops
 *     it, until it has read everything, TCP's bytes included.
 *   - the policy revision changed since either side of the connection was last admitted
 *     (FP_PASS_POLICY; lib/fastpath_flows.h): its bytes cross TC again, where conntrack re-checks
 *     policy; a revoked allow cuts it as it cuts any flow, an allow that stands confirms each
 *     endpoint's side and the connection comes back.
 *
 * A socket on TCP stays in the sockhash, and pays for tcp_bpf's copy of every send (about half of
 * plain TCP's bulk rate). Taking it out is not safe from here: an sk_msg program may not delete
 * from a sockhash, and a deletion from user space drops whatever a peer is redirecting to it at
 * that moment (the kernel resets the psock's verdict before it queues the bytes, so that moment
 * cannot be seen from BPF).
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
#include "fastpath_flows.h"

/* Per receiving socket. A bound on kernel memory like TCP's buffers (whose default maxima add up
 * to 10 MiB a connection); large enough that a reader on the writer's CPU, which runs only when
 * the writer yields, rarely sends it to TCP (measured with iperf3: 8 MiB 1.3x, 16 MiB 1.7x,
 * 32 MiB 2x plain loopback). */
#ifndef FASTPATH_QUEUE_BUDGET
#define FASTPATH_QUEUE_BUDGET (16 << 20)
#endif

/* Kernel struct offsets from the running kernel's BTF (agent/datapath/btf.py): BCC compiles
 * against headers that need not match the kernel and cannot relocate field accesses (no CO-RE).
 * The agent turns the fast path off when BTF lacks them. */
#if !defined(FP_SK_USER_DATA_OFF) || !defined(FP_PSOCK_MSG_TOT_LEN_OFF) || !defined(FP_TCP_WRITE_SEQ_OFF) || \
	!defined(FP_TCP_COPIED_SEQ_OFF)
#error "the FP_*_OFF kernel offsets must be given as -D cflags"
#endif
#define FP_SK_USER_DATA_FLAGS 0x7UL /* SK_USER_DATA_NOCOPY | _BPF | _PSOCK, tag bits of the pointer */

#define AF_INET_  2  /* AF_INET; the socket headers are not available to BPF C */
#define AF_INET6_ 10 /* AF_INET6 */

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

/* Outcomes of fastpath_msg, the index into fastpath_metrics. Each comment starts with the quoted
 * outcome label of meshagent_fastpath_messages_total: agent/datapath/redirect.py FASTPATH_OUTCOMES
 * lists them in index order (tests/unit/test_kernel_constants.py checks it). */
#define FP_REDIRECTED      0 /* "redirected": handed to the peer socket */
#define FP_PASS_NO_PEER    1 /* "pass_no_peer": fell back, the peer is not in the map */
#define FP_PASS_POLICY     2 /* "pass_policy_changed": fell back, a side is not confirmed at the current policy revision */
#define FP_PASS_QUEUE_FULL 3 /* "pass_queue_full": fell back, the peer has FASTPATH_QUEUE_BUDGET bytes unread */
#define FP_PASS_FALLEN     4 /* "pass_fallen_back": on TCP until the peer has read what TCP carried */
#define FP_PASS_NO_STATE   5 /* "pass_no_state": fell back, no fastpath_flows entry (evicted, or the update failed) */
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

/**
 * fastpath_peer_queued - bytes queued at @peer's socket that its application has not read
 *
 * sk->sk_user_data -> struct sk_psock (tag bits masked) -> msg_tot_len, the kernel's count of the
 * bytes in the psock's ingress queue. bpf_probe_read_kernel because these are plain kernel
 * pointers to the verifier (stored as numbers by sock_ops); a read of a socket that closed meanwhile
 * fails or reads another socket's count, and then msg_redirect_hash finds no peer anyway. Returns
 * -1 if a read fails.
 */
static __always_inline __u64 fastpath_psock(struct fastpath_flow *flow)
{
	__u64 psock = 0;

	if (!flow->sk || bpf_probe_read_kernel(&psock, sizeof(psock), (void *)(flow->sk + FP_SK_USER_DATA_OFF)))
		return 0;
	return psock & ~FP_SK_USER_DATA_FLAGS;
}

static __always_inline __s64 fastpath_peer_queued(struct fastpath_flow *peer)
{
	__u64 psock = fastpath_psock(peer);
	__u32 len = 0;

	if (!psock || bpf_probe_read_kernel(&len, sizeof(len), (void *)(psock + FP_PSOCK_MSG_TOT_LEN_OFF)))
		return -1;
	return len;
}

/* Has the peer's application read every byte @flow's socket gave TCP? Then redirecting again
 * cannot overtake anything. Sequence numbers wrap: compare for equality only. */
static __always_inline int fastpath_tcp_drained(struct fastpath_flow *flow, struct fastpath_flow *peer)
{
	__u32 written = 0, copied = 1;

	if (bpf_probe_read_kernel(&written, sizeof(written), (void *)(flow->sk + FP_TCP_WRITE_SEQ_OFF)) ||
	    bpf_probe_read_kernel(&copied, sizeof(copied), (void *)(peer->sk + FP_TCP_COPIED_SEQ_OFF)))
		return 0;
	return written == copied;
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
