/* Every DNS query an endpoint sends reaches the node's DNS proxy (agent/dns/proxy.py).
 *
 * A process inside an endpoint sends its queries to whatever resolver its resolv.conf names
 * (the host's, usually: nothing is rewritten in the endpoint), and that address is not reachable
 * from an endpoint. The socket hooks of bpf/redirect.c call dns_redirect() before anything else:
 * a socket of this node's endpoints (lib/netns.h) that connects (TCP, UDP) or sends (unconnected
 * UDP) to ANY address on port 53 gets datapath_config.proxy_ip:dns_port (lib/config.h) instead,
 * and the address it asked for is filed under its socket cookie. The recvmsg and getpeername hooks
 * call dns_reverse(): a peer proxy_ip:dns_port on a socket filed here is reported as the resolver
 * the socket asked for. The application never sees the proxy: glibc, for one, drops an answer
 * from an address it did not query (res_send's "not our server" check), musl too.
 *
 * Which wins: the DNS proxy. A query to a Service VIP on port 53 (a kube-dns-like Service), or to
 * an endpoint that serves DNS itself, goes to the proxy as well, as Cilium's and ztunnel's DNS
 * proxies take it: the proxy answers the mesh's names and forwards the rest to the node's
 * upstream resolvers. Only port 53 is taken; 5353 (mDNS) and DNS over TLS (853) are not DNS here.
 *
 * The TC side: from_container lets an endpoint's packets to exactly proxy_ip:dns_port through
 * whatever its egress policy says (bpf/policy.c is_dns_redirect); the proxy then decides what may
 * be looked up (toPorts.rules.dns) and refuses everything when the endpoint's egress policy does
 * not allow DNS at all.
 *
 *   dns_origdst  socket cookie -> the resolver address the socket asked for. LRU, and the
 *                sock_release hook deletes a socket's entry when it closes (resolvers open a
 *                socket per lookup). DNS_ORIGDST_MAP_SIZE: open sockets that sent a query; at
 *                65536 the LRU would evict the oldest, whose answer would then come from the
 *                proxy's address and be dropped by the resolver (a retry follows).
 *
 * Load-time options (-D cflags, agent/datapath/sockets.py MAP_SIZES): DNS_ORIGDST_MAP_SIZE.
 * Mirrored by agent/datapath/maps.py DnsOrigDstC.
 */
#ifndef __MESH_DNS_H
#define __MESH_DNS_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include "netns.h"
#include "config.h"
#include "lb.h"

#define DNS_PORT 53

struct dns_origdst {
	__u32 addr;               /* 0: network order */
	__u16 port;               /* 4: network order, as user_port holds it */
	__u16 pad;                /* 6 */
};                            /* 8 bytes */

BPF_TABLE_PINNED("lru_hash", __u64, struct dns_origdst, dns_origdst, DNS_ORIGDST_MAP_SIZE,
		 PIN_DIR "/dns_origdst");

/**
 * dns_redirect - send a DNS query to the node's DNS proxy instead
 * @ctx:  the connect or sendmsg hook's context
 * @addr: the destination asked for, network order
 * @port: its port, network order
 * @to:   out: the proxy's address and port, when 1 is returned
 *
 * Returns 1 if the destination is to be replaced by @to (and was filed for dns_reverse), 0 to
 * leave it alone: not port 53, not TCP or UDP, no DNS proxy configured, not an endpoint's socket.
 * The port comes first: every other connect() and sendmsg() on the machine costs one comparison.
 */
static __always_inline int dns_redirect(struct bpf_sock_addr *ctx, __u32 addr, __u16 port, struct dns_origdst *to)
{
	struct dns_origdst orig = { .addr = addr, .port = port };
	struct datapath_config *cfg;
	__u32 proto = ctx->protocol;
	__u64 cookie;
	int err;

	if (port != bpf_htons(DNS_PORT) || (proto != IPPROTO_UDP && proto != IPPROTO_TCP))
		return 0;
	cfg = datapath_config();
	if (!cfg || !cfg->dns_port || !cfg->proxy_ip)
		return 0;
	if (!endpoint_of_sock(ctx))
		return 0;
	cookie = lb_get_socket_cookie(ctx);
	/* BCC code generation: test the helper's result through a variable (KERNEL-NOTES). Unfiled,
	 * the answer would come from an address the resolver did not ask: leave the query alone. */
	err = dns_origdst.update(&cookie, &orig);
	if (err != 0)
		return 0;
	to->addr = cfg->proxy_ip;
	to->port = cfg->dns_port;
	return 1;
}

/**
 * dns_reverse - the resolver a DNS proxy's answer stands for
 * @ctx:  the recvmsg or getpeername hook's context
 * @addr: the peer's address, network order
 * @port: its port, network order
 *
 * Returns the address the socket asked for if the peer is the DNS proxy and the socket's query
 * was redirected, else NULL. Every recvmsg() with an address on the machine runs this: the
 * comparison with the proxy's address comes before the lookup.
 */
static __always_inline struct dns_origdst *dns_reverse(void *ctx, __u32 addr, __u16 port)
{
	struct datapath_config *cfg = datapath_config();
	__u64 cookie;

	if (!cfg || !cfg->dns_port || addr != cfg->proxy_ip || port != cfg->dns_port)
		return 0;
	cookie = lb_get_socket_cookie(ctx);
	return dns_origdst.lookup(&cookie);
}

/* A socket of an endpoint closes: its entry goes (the LRU only bounds what a missed release
 * leaves). Asking endpoint_netns first also marks the program as this node's: the agent finds its
 * attached programs by that map (agent/datapath/sockets.py). */
static __always_inline void dns_forget(struct bpf_sock *sk)
{
	__u32 proto = sk->protocol;
	__u64 cookie;

	if (proto != IPPROTO_UDP && proto != IPPROTO_TCP)
		return;
	if (!endpoint_of_sock(sk))
		return;
	cookie = lb_get_socket_cookie(sk);
	if (dns_origdst.lookup(&cookie))
		dns_origdst.delete(&cookie);
}

#endif /* __MESH_DNS_H */
