/* ipcache: which security identity owns an address. Longest-prefix match over IPv4 prefixes:
 * endpoints as /32, node addresses, and the CIDR prefixes named in policies (local CIDR identities).
 * A miss is "world".
 *
 * ipblock_cidrs: the prefixes NetworkPolicy ipBlocks name (cidr and except alike), with the same
 * local CIDR identities, and nothing else: never an endpoint's /32. In the ipcache an endpoint's
 * /32 shadows every CIDR prefix holding its address, which is Cilium's meaning of a CIDR rule and
 * stays so for CiliumNetworkPolicy; Kubernetes matches an ipBlock by address, pods included, so
 * lib/policy.h looks a peer's address up here too (policy_lookup_by_address). Empty when no
 * NetworkPolicy has an ipBlock.
 */
#ifndef __MESH_IPCACHE_H
#define __MESH_IPCACHE_H

#include "common.h"

#define IDENTITY_HOST        1
#define IDENTITY_WORLD       2
#define IDENTITY_REMOTE_NODE 6
#define IDENTITY_CIDR_BASE   16777216 /* node-local CIDR identities are 2^24 and up */

struct ipcache_key {
	__u32 prefixlen;          /* 0: LPM prefix length, 0..32 */
	__u32 addr;               /* 4: network order, so the trie's byte order is the address's */
};                            /* 8 bytes */

struct ipcache_entry {
	__u32 identity;           /* 0 */
	__u32 pad;                /* 4 */
};                            /* 8 bytes */

BPF_TABLE_PINNED("lpm_trie", struct ipcache_key, struct ipcache_entry, ipcache, IPCACHE_MAP_SIZE,
		 PIN_DIR "/ipcache", BPF_F_NO_PREALLOC);

/* Same key and value as the ipcache: prefix -> local CIDR identity. Its prefixes are a subset of the
 * ipcache's CIDR prefixes, so the ipcache's size bounds it too. */
BPF_TABLE_PINNED("lpm_trie", struct ipcache_key, struct ipcache_entry, ipblock_cidrs, IPCACHE_MAP_SIZE,
		 PIN_DIR "/ipblock_cidrs", BPF_F_NO_PREALLOC);

static __always_inline __u32 ipcache_lookup_identity(__u32 addr)
{
	struct ipcache_key key = { .prefixlen = 32, .addr = addr };
	struct ipcache_entry *entry = ipcache.lookup(&key);

	return entry ? entry->identity : IDENTITY_WORLD;
}

/* The CIDR identity of the most specific ipBlock prefix holding @addr, or 0 if none does. */
static __always_inline __u32 ipblock_lookup_identity(__u32 addr)
{
	struct ipcache_key key = { .prefixlen = 32, .addr = addr };
	struct ipcache_entry *entry = ipblock_cidrs.lookup(&key);

	return entry ? entry->identity : 0;
}

#endif /* __MESH_IPCACHE_H */
