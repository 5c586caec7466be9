/* ipcache: which security identity owns an address. Longest-prefix match over IPv4 prefixes:
 * endpoints as /32, node addresses, and the CIDR prefixes named in policies (local CIDR identities).
 * A miss is "world". */
#ifndef __MESH_IPCACHE_H
#define __MESH_IPCACHE_H

#include "common.h"

#define IDENTITY_HOST        1
#define IDENTITY_WORLD       2
#define IDENTITY_REMOTE_NODE 6

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

static __always_inline __u32 ipcache_lookup_identity(__u32 addr)
{
	struct ipcache_key key = { .prefixlen = 32, .addr = addr };
	struct ipcache_entry *entry = ipcache.lookup(&key);

	return entry ? entry->identity : IDENTITY_WORLD;
}

#endif /* __MESH_IPCACHE_H */
