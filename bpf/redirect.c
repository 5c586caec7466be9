/* Socket-level service handling: cgroup socket-address hooks, attached at the cgroup-v2 root.
 *
 *   sock4_connect      BPF_CGROUP_INET4_CONNECT      connect() to a VIP -> a backend (TCP, UDP)
 *   sock4_sendmsg      BPF_CGROUP_UDP4_SENDMSG       sendto() a VIP on an unconnected UDP socket
 *   sock4_recvmsg      BPF_CGROUP_UDP4_RECVMSG       a backend's datagram is reported as the VIP's
 *   sock4_getpeername  BPF_CGROUP_INET4_GETPEERNAME  getpeername() reports the VIP
 *   sock6_*            the same four for AF_INET6 sockets that use IPv4-mapped addresses
 *                      (::ffff:a.b.c.d; Java and other dual-stack clients do by default): the
 *                      kernel runs only the INET6 hooks for them. Native IPv6 passes untouched.
 *   sock_release       BPF_CGROUP_INET_SOCK_RELEASE  a socket closes: forget its DNS redirect
 *   sock_ops           BPF_CGROUP_SOCK_OPS           a connection redirected to the L7 processor
 *                      has its local port now: publish its original destination by client
 *                      address (l7_pending -> l7_origdst, lib/lb.h); an eligible connection is
 *                      established: add the socket to the fast path (lib/sockmap.h)
 *   fastpath_msg       BPF_SK_MSG_VERDICT on the fastpath_socks map: sendmsg() on a socket of the
 *                      fast path, hand the bytes to the peer socket or fall back to TCP
 *
 * DNS (lib/dns.h): connect() and sendmsg() to any address on port 53 from an endpoint's socket go to
 * the node's DNS proxy; recvmsg() and getpeername() report the resolver the socket asked for. This
 * comes first: a Service VIP on port 53 is DNS too, and goes to the proxy.
 *
 * L7 services (LB_F_L7, TCP only): connect() goes to the node's L7 processor (lb_config) instead
 * of a backend; getpeername() still reports the VIP. Without a processor in lb_config they are
 * balanced as L4 services.
 *
 * Why the root: cgroup hooks run for the sockets of processes in the cgroup they are attached to
 * and its descendants, and a process inside an endpoint may sit in any cgroup (`ip netns exec`
 * does not move it, a container runtime picks its own). At the root they run for every socket of
 * the machine; endpoint_of_sock() (lib/netns.h) then limits them to sockets created in one of this
 * node's endpoint namespaces. Several nodes' agents on one machine each attach their own copy
 * (BPF_F_ALLOW_MULTI); each acts only on its own endpoints' sockets. Maps: lib/lb.h.
 *
 * Return values: 1 lets the syscall proceed, 0 fails it (with -EPERM unless bpf_set_retval chose
 * another error). recvmsg and getpeername hooks must always return 1.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include <uapi/linux/errno.h>
#include "lib/netns.h"
#include "lib/lb.h"
#include "lib/sockmap.h"
#include "lib/dns.h"

#define SYS_PROCEED 1
#define SYS_REJECT  0

/**
 * __sock_xlate_fwd - the backend for a connect() or sendmsg() destination
 * @ctx:   the hook's context (for the namespace and socket cookies, and the protocol)
 * @vip:   destination address, network order
 * @vport: destination port, network order
 * @out:   out: the backend to use instead, or NULL to leave the destination as it is
 *
 * Returns SYS_PROCEED, or SYS_REJECT for a service without backends: the call then fails at once
 * with ECONNREFUSED (bpf_set_retval), as connecting to a port nobody listens on would. The
 * operator sees "Connection refused" at the client instead of a timeout, and nothing leaves the
 * endpoint towards an address that exists nowhere. An L7 service goes to the L7 processor even
 * without backends: the processor answers (503) and records the request.
 */
static __always_inline int __sock_xlate_fwd(struct bpf_sock_addr *ctx, __u32 vip, __u16 vport,
					    struct lb4_backend *out)
{
	struct endpoint_netns_info *ep;
	struct lb4_service *svc;
	struct lb4_backend *be;
	__u8 proto = ctx->protocol;

	out->ip = 0;
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return SYS_PROCEED;
	ep = endpoint_of_sock(ctx);
	if (!ep)
		return SYS_PROCEED;
	svc = lb4_lookup_service(vip, vport, proto);
	if (!svc)
		return SYS_PROCEED;
	if ((svc->flags & LB_F_L7) && proto == IPPROTO_TCP) {
		struct lb_config *cfg = lb_get_config();

		if (cfg && cfg->proxy_ip) {
			struct l7_origdst od = {
				.vip = vip, .port = vport, .ep_id = ep->ep_id, .identity = ep->identity,
			};
			__u64 cookie = lb_get_socket_cookie(ctx);

			out->ip = cfg->proxy_ip;
			out->port = cfg->proxy_port;
			l7_pending.update(&cookie, &od);
			lb4_revnat_update(cookie, out, vip, vport);
			return SYS_PROCEED;
		}
	}
	if (svc->backend_count == 0)
		goto refuse;
	be = lb4_select_backend(svc);
	if (!be)
		goto refuse;
	lb4_revnat_update(lb_get_socket_cookie(ctx), be, vip, vport);
	*out = *be;
	return SYS_PROCEED;
refuse:
	bpf_set_retval(-ECONNREFUSED);
	return SYS_REJECT;
}

/* The VIP a translated peer stands for, or NULL. */
static __always_inline struct lb4_revnat *__sock_xlate_rev(struct bpf_sock_addr *ctx, __u32 ip, __u16 port)
{
	if (!endpoint_of_sock(ctx))
		return 0;
	return lb4_revnat_lookup(lb_get_socket_cookie(ctx), ip, port);
}

static __always_inline int sock4_xlate_fwd(struct bpf_sock_addr *ctx)
{
	struct dns_origdst dns = {};
	struct lb4_backend be = {};
	__u32 ip = ctx->user_ip4;
	__u16 port = (__u16)ctx->user_port; /* network order in the low 16 bits */
	int ret;

	if (dns_redirect(ctx, ip, port, &dns)) {
		ctx->user_ip4 = dns.addr;
		ctx->user_port = dns.port;
		return SYS_PROCEED;
	}
	ret = __sock_xlate_fwd(ctx, ip, port, &be);
	if (be.ip) { /* 0.0.0.0 is never a backend */
		ctx->user_ip4 = be.ip;
		ctx->user_port = be.port;
	}
	return ret;
}

static __always_inline int sock4_xlate_rev(struct bpf_sock_addr *ctx)
{
	__u32 ip = ctx->user_ip4;
	__u16 port = (__u16)ctx->user_port;
	struct dns_origdst *dns = dns_reverse(ctx, ip, port);
	struct lb4_revnat *rev;

	if (dns) {
		ctx->user_ip4 = dns->addr;
		ctx->user_port = dns->port;
		return SYS_PROCEED;
	}
	rev = __sock_xlate_rev(ctx, ip, port);
	if (rev) {
		ctx->user_ip4 = rev->vip;
		ctx->user_port = rev->port;
	}
	return SYS_PROCEED;
}

/* ::ffff:0:0/96, the IPv4-mapped prefix, as the three leading words of user_ip6. */
static __always_inline int is_v4_mapped(struct bpf_sock_addr *ctx)
{
	return ctx->user_ip6[0] == 0 && ctx->user_ip6[1] == 0 && ctx->user_ip6[2] == bpf_htonl(0xffff);
}

static __always_inline int sock6_xlate_fwd(struct bpf_sock_addr *ctx)
{
	struct dns_origdst dns = {};
	struct lb4_backend be = {};
	__u32 ip;
	__u16 port;
	int ret;

	if (!is_v4_mapped(ctx))
		return SYS_PROCEED;
	ip = ctx->user_ip6[3];
	port = (__u16)ctx->user_port;
	if (dns_redirect(ctx, ip, port, &dns)) {
		ctx->user_ip6[3] = dns.addr;
		ctx->user_port = dns.port;
		return SYS_PROCEED;
	}
	ret = __sock_xlate_fwd(ctx, ip, port, &be);
	if (be.ip) {
		ctx->user_ip6[3] = be.ip;
		ctx->user_port = be.port;
	}
	return ret;
}

static __always_inline int sock6_xlate_rev(struct bpf_sock_addr *ctx)
{
	struct dns_origdst *dns;
	struct lb4_revnat *rev;
	__u32 ip;
	__u16 port;

	if (!is_v4_mapped(ctx))
		return SYS_PROCEED;
	ip = ctx->user_ip6[3];
	port = (__u16)ctx->user_port;
	dns = dns_reverse(ctx, ip, port);
	if (dns) {
		ctx->user_ip6[3] = dns->addr;
		ctx->user_port = dns->port;
		return SYS_PROCEED;
	}
	rev = __sock_xlate_rev(ctx, ip, port);
	if (rev) {
		ctx->user_ip6[3] = rev->vip;
		ctx->user_port = rev->port;
	}
	return SYS_PROCEED;
}

int sock4_connect(struct bpf_sock_addr *ctx)
{
	return sock4_xlate_fwd(ctx);
}

int sock4_sendmsg(struct bpf_sock_addr *ctx)
{
	return sock4_xlate_fwd(ctx);
}

int sock4_recvmsg(struct bpf_sock_addr *ctx)
{
	return sock4_xlate_rev(ctx);
}

int sock4_getpeername(struct bpf_sock_addr *ctx)
{
	return sock4_xlate_rev(ctx);
}

int sock6_connect(struct bpf_sock_addr *ctx)
{
	return sock6_xlate_fwd(ctx);
}

int sock6_sendmsg(struct bpf_sock_addr *ctx)
{
	return sock6_xlate_fwd(ctx);
}

int sock6_recvmsg(struct bpf_sock_addr *ctx)
{
	return sock6_xlate_rev(ctx);
}

int sock6_getpeername(struct bpf_sock_addr *ctx)
{
	return sock6_xlate_rev(ctx);
}

int sock_release(struct bpf_sock *sk)
{
	dns_forget(sk);
	return 1;
}

/* The L7 processor accepts the connection and knows only its peer, the client's address and port;
 * the port is bound during connect(), after the connect hook ran. TCP_CONNECT_CB runs once it is
 * bound and before the SYN leaves, so the entry is in l7_origdst before the processor can accept
 * the connection; ACTIVE_ESTABLISHED_CB is a second chance should the first update have failed. */
static __always_inline void l7_publish_origdst(struct bpf_sock_ops *skops)
{
	struct l7_client_key key = {};
	struct l7_origdst *od;
	__u64 cookie;
	int err;

	if (!endpoint_of_sock(skops))
		return;
	cookie = lb_get_socket_cookie(skops);
	od = l7_pending.lookup(&cookie);
	if (!od)
		return;
	key.ip = skops->local_ip4;                      /* network order */
	key.port = bpf_htons((__u16)skops->local_port); /* host order in the context */
	/* BCC code generation: test the helper's result through a variable (KERNEL-NOTES). */
	err = l7_origdst.update(&key, od);
	if (err == 0)
		l7_pending.delete(&cookie);
}

/* Both ends of a connection call this from their ESTABLISHED callback; see lib/sockmap.h for who
 * is eligible. The flow state goes in first: a socket in fastpath_socks without it falls back. */
static __always_inline void fastpath_add(struct bpf_sock_ops *skops)
{
	struct fastpath_config *cfg = fastpath_get_config();
	struct datapath_config *dp = datapath_config();
	struct fastpath_flow flow = {};
	struct sock_key key = {};
	__u64 netns;

	if (!cfg || !(cfg->flags & FP_CFG_ENABLED))
		return;
	/* Every address word is loaded up front, each from its own ctx field: choosing between the
	 * IPv4 and the mapped-IPv6 field later, clang would load through a ctx pointer it moved, which
	 * the verifier refuses ("dereference of modified ctx ptr"). */
	__u32 family = skops->family, l4 = skops->local_ip4, r4 = skops->remote_ip4;
	__u32 l0 = skops->local_ip6[0], l1 = skops->local_ip6[1], l2 = skops->local_ip6[2], l3 = skops->local_ip6[3];
	__u32 r0 = skops->remote_ip6[0], r1 = skops->remote_ip6[1], r2 = skops->remote_ip6[2], r3 = skops->remote_ip6[3];

	if (family == AF_INET_) {
		key.local_ip = l4;
		key.remote_ip = r4;
	} else if (family == AF_INET6_ && !l0 && !l1 && l2 == bpf_htonl(0xffff) && !r0 && !r1 &&
		   r2 == bpf_htonl(0xffff)) {
		/* a dual-stack socket ([::] servers, Java clients) talking IPv4: its peer may be AF_INET */
		key.local_ip = l3;
		key.remote_ip = r3;
	} else {
		return;
	}
	key.local_port = (__u16)skops->local_port;             /* host order */
	key.remote_port = (__u16)bpf_ntohl(skops->remote_port); /* network order, in the upper half */
	netns = bpf_get_netns_cookie(skops);
	if (fastpath_is_loopback(key.local_ip) && fastpath_is_loopback(key.remote_ip)) {
		/* Only inside endpoints: the node's namespace is often the host's, whose loopback
		 * traffic is none of the mesh's business. */
		if (!endpoint_netns.lookup(&netns))
			return;
		key.netns = netns;
	} else if (!fastpath_in_pods(cfg, key.local_ip) || !fastpath_in_pods(cfg, key.remote_ip)) {
		return;
	} else if (netns == cfg->node_netns) {
		flow.flags = FP_FLOW_NODE_SIDE;
	} else if (!endpoint_netns.lookup(&netns)) {
		return;
	}
	/* The handshake just crossed TC: admitted at the current revision (or a newer one, which
	 * only sends it through TC once more). */
	flow.revision = dp ? dp->policy_revision : 0;
	flow.sk = (__u64)skops->sk; /* a kernel address as a number: needs CAP_PERFMON (the agent's root) */
	if (fastpath_flows.update(&key, &flow) != 0)
		return;
	fastpath_socks.sock_hash_update(skops, &key, BPF_ANY);
}

/* Every other socket costs one comparison of the op. */
int sock_ops(struct bpf_sock_ops *skops)
{
	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		l7_publish_origdst(skops);
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		l7_publish_origdst(skops);
		fastpath_add(skops);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		fastpath_add(skops);
		break;
	}
	return 1;
}

/* This send takes TCP. */
static __always_inline int fastpath_tcp(__u32 size, __u32 outcome)
{
	fastpath_count(outcome, size);
	return SK_PASS;
}

/**
 * fastpath_msg - sendmsg() on a socket of fastpath_socks: redirect to the peer, or take TCP
 * @msg: the message (for a large write, one chunk of it: the kernel runs this per chunk)
 *
 * Always SK_PASS: with a target set by msg_redirect_hash the bytes go to the peer's receive queue,
 * without one they take the TCP path. (SK_DROP would fail the sendmsg() with EACCES.) When to
 * switch between the two: lib/sockmap.h.
 */
int fastpath_msg(struct sk_msg_md *msg)
{
	struct datapath_config *dp = datapath_config();
	struct fastpath_flow *flow, *peer_flow;
	struct sock_key key = {}, peer = {};
	__u32 size = msg->size, revision;
	__s64 queued;

	__u32 family = msg->family, l4 = msg->local_ip4, r4 = msg->remote_ip4; /* up front: as in fastpath_add */
	__u32 l3 = msg->local_ip6[3], r3 = msg->remote_ip6[3];

	/* keep clang from sinking the four loads into one through a ctx pointer picked by family */
	asm volatile("" : "+r"(l4), "+r"(r4), "+r"(l3), "+r"(r3));

	/* only IPv4-mapped AF_INET6 sockets are added besides AF_INET ones (fastpath_add) */
	key.local_ip = family == AF_INET_ ? l4 : l3;
	key.remote_ip = family == AF_INET_ ? r4 : r3;
	key.local_port = (__u16)msg->local_port;
	key.remote_port = (__u16)bpf_ntohl(msg->remote_port);
	if (fastpath_is_loopback(key.local_ip) && fastpath_is_loopback(key.remote_ip))
		key.netns = bpf_get_netns_cookie(msg);
	flow = fastpath_flows.lookup(&key);
	if (!flow) { /* evicted: it stays on TCP, in the map */
		fastpath_count(FP_PASS_NO_STATE, size);
		return SK_PASS;
	}
	peer.local_ip = key.remote_ip;
	peer.remote_ip = key.local_ip;
	peer.local_port = key.remote_port;
	peer.remote_port = key.local_port;
	peer.netns = key.netns;
	peer_flow = fastpath_flows.lookup(&peer);
	if (flow->flags & FP_FLOW_TCP_FOR_GOOD)
		return fastpath_tcp(size, FP_PASS_FALLEN);
	if (!peer_flow) { /* not (yet) on the fast path: a client may write before the server joins */
		flow->flags |= FP_FLOW_ON_TCP;
		return fastpath_tcp(size, FP_PASS_NO_PEER);
	}
	/* After a policy change: through TC until each side's hook has re-checked the connection
	 * (lib/fastpath_flows.h); the bytes sent meanwhile are what TC re-checks it on. */
	revision = dp ? dp->policy_revision : 0;
	if (!fastpath_admitted(&key, flow, revision) || !fastpath_admitted(&peer, peer_flow, revision)) {
		flow->flags |= FP_FLOW_ON_TCP;
		return fastpath_tcp(size, FP_PASS_POLICY);
	}
	if ((flow->flags & FP_FLOW_ON_TCP) && !fastpath_tcp_drained(flow, peer_flow))
		return fastpath_tcp(size, FP_PASS_FALLEN);
	queued = fastpath_peer_queued(peer_flow);
	if (queued < 0 || queued + size > FASTPATH_QUEUE_BUDGET) {
		flow->flags |= FP_FLOW_ON_TCP;
		return fastpath_tcp(size, FP_PASS_QUEUE_FULL);
	}
	if (fastpath_socks.msg_redirect_hash(msg, &peer, BPF_F_INGRESS) != SK_PASS) {
		flow->flags |= FP_FLOW_ON_TCP; /* the peer closed, or has not joined the sockhash yet */
		return fastpath_tcp(size, FP_PASS_NO_PEER);
	}
	flow->flags &= ~FP_FLOW_ON_TCP;
	fastpath_count(FP_REDIRECTED, size);
	return SK_PASS;
}
