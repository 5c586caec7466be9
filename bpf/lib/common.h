/* Shared definitions of the meshagent datapath: directions, verdicts, the per-endpoint table and
 * the global config. Every struct here is mirrored by agent/datapath/maps.py, which checks its
 * ctypes copies against the types BCC builds from this C at load time (our alignchecker).
 *
 * Load-time options come in as -D cflags from agent/datapath/loader.py:
 *   PIN_DIR          bpffs directory of this node's pinned maps, e.g. "/sys/fs/bpf/meshagent/n1"
 *   CT_MAP_SIZE, POLICY_MAP_SIZE, IPCACHE_MAP_SIZE, ENDPOINT_MAP_SIZE
 */
#ifndef __MESH_COMMON_H
#define __MESH_COMMON_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/in.h>

#ifndef PIN_DIR
#error "PIN_DIR must be given as a -D cflag (the node's bpffs directory)"
#endif

/* Direction as seen from the endpoint. */
#define DIR_INGRESS 0 /* towards the endpoint: TC egress of the host-side veth */
#define DIR_EGRESS  1 /* from the endpoint: TC ingress of the host-side veth */

/* Verdicts, numbered as Hubble's flow.Verdict. */
#define VERDICT_FORWARDED  1
#define VERDICT_DROPPED    2
#define VERDICT_REDIRECTED 4
#define VERDICT_AUDIT      6

/* Proxy marks: the node's L7 processor connects to a backend on behalf of a client and sets a
 * mark on that upstream socket (SO_MARK; userspace_l7/origdst.py upstream_mark). The proxy's packets
 * carry a host address; to_container believes the mark instead, so policy decides on the real
 * client (Cilium's MARK_MAGIC_PROXY_EGRESS and MARK_MAGIC_IDENTITY). Only a packet from a HOST
 * address is believed: setting SO_MARK needs CAP_NET_ADMIN in the node's namespace, and the mark
 * does not cross namespaces. The top byte says what the low 24 bits hold:
 *
 *   MARK_MAGIC_PROXY_EGRESS | ep_id     a client endpoint of this node (bits 16..23 zero). Both
 *                                       its egress policy towards the backend and the backend's
 *                                       ingress policy from its identity decide (endpoints_by_id).
 *   MARK_MAGIC_IDENTITY | identity      a peer known only by its identity (no endpoint here, so
 *                                       none of our egress policy applies): the backend's ingress
 *                                       policy decides on that identity alone.
 */
#define MARK_MAGIC_MASK         0xFF000000
#define MARK_MAGIC_IDENTITY     0x0E000000
#define MARK_IDENTITY_MASK      0x00FFFFFF /* identities are < 2^24 */
#define MARK_MAGIC_PROXY_EGRESS 0x0B000000
#define MARK_EP_ID_MASK         0x0000FFFF

/* Endpoint flags: is default deny on in a direction, and is it only audited. */
#define EP_F_ENFORCE_INGRESS 0x1
#define EP_F_ENFORCE_EGRESS  0x2
#define EP_F_AUDIT_INGRESS   0x4
#define EP_F_AUDIT_EGRESS    0x8

/* One entry per local endpoint, keyed by the ifindex of its host-side veth (the device both TC
 * programs run on, so skb->ifindex finds it in either direction). Addresses in network order. */
struct endpoint_info {
	__u32 ip;                 /*  0: the only source address the endpoint may use */
	__u32 identity;           /*  4: security identity of its labels */
	__u16 ep_id;              /*  8: node-local endpoint id, part of policy and CT keys */
	__u8  flags;              /* 10: EP_F_* */
	__u8  pad;                /* 11 */
	__u32 deny_rule_ingress;  /* 12: rule id reported for a default deny, ingress */
	__u32 deny_rule_egress;   /* 16: the same, egress */
};                            /* 20 bytes */

/* Indexed by ifindex: an array lookup is inlined by the verifier, a hash lookup is a helper call
 * (about 25 ns a packet here). ifindexes grow with every link a namespace creates, so the few
 * endpoints beyond the array live in endpoints_hi. An array slot with ep_id 0 is empty. */
#define ENDPOINT_ARRAY_SIZE 65536

BPF_TABLE_PINNED("array", __u32, struct endpoint_info, endpoints, ENDPOINT_ARRAY_SIZE,
		 PIN_DIR "/endpoints");
BPF_TABLE_PINNED("hash", __u32, struct endpoint_info, endpoints_hi, ENDPOINT_MAP_SIZE,
		 PIN_DIR "/endpoints_hi");

static __always_inline struct endpoint_info *lookup_endpoint(__u32 ifindex)
{
	struct endpoint_info *ep;

	if (ifindex >= ENDPOINT_ARRAY_SIZE)
		return endpoints_hi.lookup(&ifindex);
	ep = endpoints.lookup(&ifindex);
	return ep && ep->ep_id ? ep : 0;
}

/* The same entries keyed by ep_id, for a packet that names its endpoint by id rather than by the
 * device it is on: the L7 processor's upstream packets carry the client's ep_id in their mark
 * (MARK_MAGIC_PROXY_EGRESS), and to_container needs that client's identity and egress policy.
 * A hash: only the first packet of a proxied flow and its policy re-checks look here. Written by
 * the agent together with the endpoint table (agent/reconcile.py). */
BPF_TABLE_PINNED("hash", __u16, struct endpoint_info, endpoints_by_id, 65536, PIN_DIR "/endpoints_by_id",
		 BPF_F_NO_PREALLOC);

static __always_inline struct endpoint_info *lookup_endpoint_by_id(__u16 ep_id)
{
	return ep_id ? endpoints_by_id.lookup(&ep_id) : 0;
}

/* The global config (policy_revision, the L7 processor): lib/config.h. */
#include "config.h"

#endif /* __MESH_COMMON_H */
