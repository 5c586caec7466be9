/* Connect-time load balancing of service VIPs (IPv4): services, their backends, reverse NAT.
 *
 * A socket of a local endpoint that connects (or, for unconnected UDP, sends) to VIP:port gets a
 * backend's address instead, once, in the socket hook (bpf/redirect.c): there is no per-packet
 * NAT, the packets carry the backend's address from the start, and L4 policy on the endpoint's veth
 * sees (and decides on) the real backend. getpeername() and recvmsg() are answered with the VIP
 * again through lb_revnat, so the application only ever sees the address it asked for.
 *
 *   lb_services  (VIP, port, proto) -> service id, backend count, flags
 *   lb_backends  (service id, slot) -> backend address; slots 0 .. backend_count-1 exist
 *   lb_revnat    (socket cookie, backend) -> VIP, LRU: entries of closed sockets age out
 *
 * Update protocol (agent/datapath/redirect.py sync_services, the only writer): a service's
 * backend slots are written before backend_count grows to include them, and slots beyond a shrunk
 * count are deleted only after the count is lowered, so a lookup of any slot below the count it
 * read always finds a backend. A new service's slots are written before its lb_services entry; a
 * removed service's entry is deleted before its slots.
 *
 * Weights: the pick is uniform over slots, so a backend listed in k slots gets k shares.
 *
 * L7 services (LB_F_L7, TCP): connect() goes to the node's L7 processor (lb_config) instead of a
 * backend, and the processor learns where the connection was going and who made it:
 *
 *   l7_pending   socket cookie -> l7_origdst      written by the connect hook
 *   l7_origdst   (client ip, client port) -> l7_origdst
 *                moved there by the sockops program once connect() has bound the client's port
 *                (BPF_SOCK_OPS_TCP_CONNECT_CB, before the SYN leaves); looked up and deleted by
 *                the processor with the peer address of the connection it accepted
 *                (userspace_l7/origdst.py). Both LRU: entries of connections that never reach the
 *                processor age out.
 *
 * getpeername() still says VIP:port (lb_revnat, with the processor as the "backend").
 *
 * Load-time options (-D cflags from redirect.py): PIN_DIR, LB_SERVICE_MAP_SIZE,
 * LB_BACKEND_MAP_SIZE, LB_REVNAT_MAP_SIZE, L7_PENDING_MAP_SIZE, L7_ORIGDST_MAP_SIZE. Every struct
 * is mirrored in redirect.py and checked against BCC's types at load time.
 */
#ifndef __MESH_LB_H
#define __MESH_LB_H

#include <uapi/linux/bpf.h>

#ifndef PIN_DIR
#error "PIN_DIR must be given as a -D cflag (the node's bpffs directory)"
#endif

/* Service flags. */
#define LB_F_L7 0x1 /* TCP: redirect to the node's L7 processor (balanced as L4 while lb_config has none) */

/* Ordered as the socket hook reads them from struct bpf_sock_addr: user_ip4, user_port, protocol. */
struct lb4_key {
	__u32 vip;                /* 0: network order */
	__u16 port;               /* 4: network order */
	__u8  proto;              /* 6: IPPROTO_TCP or IPPROTO_UDP */
	__u8  pad;                /* 7 */
};                            /* 8 bytes */

struct lb4_service {
	__u32 service_id;         /* 0: node-local, > 0; names the service's slots in lb_backends */
	__u16 backend_count;      /* 4: slots 0 .. backend_count-1; 0 = refuse connections */
	__u8  flags;              /* 6: LB_F_* */
	__u8  pad;                /* 7 */
};                            /* 8 bytes */

BPF_TABLE_PINNED("hash", struct lb4_key, struct lb4_service, lb_services, LB_SERVICE_MAP_SIZE,
		 PIN_DIR "/lb_services");

struct lb4_backend_key {
	__u32 service_id;         /* 0 */
	__u16 slot;               /* 4: host order */
	__u16 pad;                /* 6 */
};                            /* 8 bytes */

struct lb4_backend {
	__u32 ip;                 /* 0: network order */
	__u16 port;               /* 4: network order, as user_port wants it */
	__u16 pad;                /* 6 */
};                            /* 8 bytes */

BPF_TABLE_PINNED("hash", struct lb4_backend_key, struct lb4_backend, lb_backends, LB_BACKEND_MAP_SIZE,
		 PIN_DIR "/lb_backends");

/* Keyed by the backend too, not by the cookie alone: an unconnected UDP socket may talk to several
 * services, and a socket that connects again elsewhere must not be reported as the old VIP. */
struct lb4_revnat_key {
	__u64 cookie;             /*  0: bpf_get_socket_cookie of the client socket */
	__u32 ip;                 /*  8: backend address, network order */
	__u16 port;               /* 12: backend port, network order */
	__u16 pad;                /* 14 */
};                            /* 16 bytes */

struct lb4_revnat {
	__u32 vip;                /* 0: network order */
	__u16 port;               /* 4: network order */
	__u16 pad;                /* 6 */
};                            /* 8 bytes */

BPF_TABLE_PINNED("lru_hash", struct lb4_revnat_key, struct lb4_revnat, lb_revnat, LB_REVNAT_MAP_SIZE,
		 PIN_DIR "/lb_revnat");

/* The node's L7 processor, one element (RedirectDatapath.set_proxy). proxy_ip 0: none. */
struct lb_config {
	__u32 proxy_ip;           /* 0: network order */
	__u16 proxy_port;         /* 4: network order, as user_port wants it */
	__u16 pad;                /* 6 */
};                            /* 8 bytes */

BPF_TABLE_PINNED("array", __u32, struct lb_config, lb_config, 1, PIN_DIR "/lb_config");

/* What the L7 processor learns about a redirected connection. */
struct l7_origdst {
	__u32 vip;                /*  0: original destination, network order */
	__u16 port;               /*  4: network order */
	__u16 ep_id;              /*  6: the client's endpoint (endpoint_netns) */
	__u32 identity;           /*  8: the client's security identity */
	__u32 pad;                /* 12 */
};                            /* 16 bytes */

/* The client's end of the connection, as the processor's accept() reports its peer. */
struct l7_client_key {
	__u32 ip;                 /* 0: network order */
	__u16 port;               /* 4: network order */
	__u16 pad;                /* 6 */
};                            /* 8 bytes */

BPF_TABLE_PINNED("lru_hash", __u64, struct l7_origdst, l7_pending, L7_PENDING_MAP_SIZE,
		 PIN_DIR "/l7_pending");
BPF_TABLE_PINNED("lru_hash", struct l7_client_key, struct l7_origdst, l7_origdst, L7_ORIGDST_MAP_SIZE,
		 PIN_DIR "/l7_origdst");

static __always_inline struct lb_config *lb_get_config(void)
{
	__u32 zero = 0;

	return lb_config.lookup(&zero);
}

/* BCC 0.26 declares bpf_get_socket_cookie() as returning u32, which would cut the cookie in half;
 * the helper returns the full u64. */
static __u64 (*lb_get_socket_cookie)(void *ctx) = (void *)BPF_FUNC_get_socket_cookie;

static __always_inline struct lb4_service *lb4_lookup_service(__u32 vip, __u16 port, __u8 proto)
{
	struct lb4_key key = { .vip = vip, .port = port, .proto = proto };

	return lb_services.lookup(&key);
}

/**
 * lb4_select_backend - pick one backend of a service
 * @svc: the service, with backend_count > 0
 *
 * Uniform random over the slots: bpf_get_prandom_u32() % backend_count. The modulo bias is at most
 * backend_count / 2^32, far below anything measurable. Returns NULL only if the slot is missing,
 * which the update protocol above rules out (a bug or a hand-edited map).
 */
static __always_inline struct lb4_backend *lb4_select_backend(struct lb4_service *svc)
{
	struct lb4_backend_key key = {
		.service_id = svc->service_id,
		.slot = bpf_get_prandom_u32() % svc->backend_count,
	};

	return lb_backends.lookup(&key);
}

/* Remember that @cookie's peer @be is really @vip:@port (network order). */
static __always_inline void lb4_revnat_update(__u64 cookie, struct lb4_backend *be, __u32 vip, __u16 port)
{
	struct lb4_revnat_key key = { .cookie = cookie, .ip = be->ip, .port = be->port };
	struct lb4_revnat val = { .vip = vip, .port = port };

	lb_revnat.update(&key, &val);
}

static __always_inline struct lb4_revnat *lb4_revnat_lookup(__u64 cookie, __u32 ip, __u16 port)
{
	struct lb4_revnat_key key = { .cookie = cookie, .ip = ip, .port = port };

	return lb_revnat.lookup(&key);
}

#endif /* __MESH_LB_H */
