/* Which network namespaces are this node's endpoints.
 *
 * Socket hooks (bpf/redirect.c) are attached at the cgroup-v2 root so that they run for every
 * process on the machine, however it was started (`meshagent exec`, `ip netns exec`, a container
 * runtime): a process's cgroup says nothing about which endpoint it belongs to, its socket's
 * network namespace does. The hooks act only on sockets whose namespace cookie
 * (bpf_get_netns_cookie, the value of getsockopt(SO_NETNS_COOKIE) inside the namespace) is listed
 * here, and leave every other socket, including other nodes' endpoints, untouched.
 *
 * Written by agent/datapath/redirect.py (set_endpoint_netns / remove_endpoint_netns), mirrored by
 * its EndpointNetnsC.
 */
#ifndef __MESH_NETNS_H
#define __MESH_NETNS_H

#include <uapi/linux/bpf.h>

#ifndef PIN_DIR
#error "PIN_DIR must be given as a -D cflag (the node's bpffs directory)"
#endif

struct endpoint_netns_info {
	__u16 ep_id;              /* 0: node-local endpoint id, as in endpoint_info */
	__u16 pad;                /* 2 */
	__u32 identity;           /* 4: security identity of the endpoint's labels */
};                            /* 8 bytes */

/* Key: the namespace cookie (u64, unique for the machine's uptime, never reused). */
BPF_TABLE_PINNED("hash", __u64, struct endpoint_netns_info, endpoint_netns, ENDPOINT_NETNS_MAP_SIZE,
		 PIN_DIR "/endpoint_netns");

/* The endpoint owning the socket behind @ctx, or NULL if its namespace is not one of ours. */
static __always_inline struct endpoint_netns_info *endpoint_of_sock(void *ctx)
{
	__u64 cookie = bpf_get_netns_cookie(ctx);

	return endpoint_netns.lookup(&cookie);
}

#endif /* __MESH_NETNS_H */
