/* The global datapath config, one element, shared by bpf/policy.c and bpf/redirect.c (whose
 * socket fast path, lib/sockmap.h, reads policy_revision too). Its own header so that
 * bpf/redirect.c gets this map without the endpoint tables of common.h. Mirrored by
 * agent/datapath/maps.py DatapathConfigC.
 */
#ifndef __MESH_CONFIG_H
#define __MESH_CONFIG_H

#include <uapi/linux/bpf.h>

#ifndef PIN_DIR
#error "PIN_DIR must be given as a -D cflag (the node's bpffs directory)"
#endif

/* Global datapath config, one element. The agent bumps policy_revision after every change to
 * the policy map or the ipcache; conntrack entries from an older revision re-check policy on
 * their next packet, which is how a revoked allow cuts an established flow.
 *
 * proxy_ip:proxy_port is the node's L7 processor (Datapath.set_proxy; the same address the socket
 * hooks of bpf/redirect.c send L7 services to): a new TCP flow from an endpoint to it is a
 * redirect (VERDICT_REDIRECTED), admitted here; the endpoint's egress policy is applied
 * to the processor's upstream connection instead, at the backend (MARK_MAGIC_PROXY_EGRESS). 0 = none.
 *
 * dns_port is the node's DNS proxy, at proxy_ip:dns_port (UDP and TCP): the socket hooks of
 * bpf/redirect.c send every DNS query of an endpoint there (lib/dns.h), and from_container lets
 * those packets through whatever the egress policy (bpf/policy.c is_dns_redirect). 0 = no DNS
 * proxy: DNS is left alone. It took the place of the old padding, so the struct kept its size and
 * an older agent's pinned map is adopted as it is (its 0 there means off).
 * Writers change one field and keep the others (read, modify, write the element back). */
struct datapath_config {
	__u32 policy_revision;    /* 0 */
	__u32 proxy_ip;           /* 4: network order; 0 = no L7 processor */
	__u16 proxy_port;         /* 8: network order */
	__u16 dns_port;           /* 10: network order; 0 = no DNS proxy */
};                            /* 12 bytes */

BPF_TABLE_PINNED("array", __u32, struct datapath_config, config_map, 1, PIN_DIR "/config");

static __always_inline struct datapath_config *datapath_config(void)
{
	__u32 zero = 0;

	return config_map.lookup(&zero);
}

#endif /* __MESH_CONFIG_H */
