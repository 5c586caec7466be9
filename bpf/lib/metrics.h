/* Per-reason packet and byte counters: meshagent_drop_count / meshagent_forward_count, read by
 * agent/datapath/loader.py metrics(). Bumped by the two exits of bpf/policy.c: send_drop_notify()
 * (lib/drop.h) and send_trace_notify() (lib/trace.h).
 */
#ifndef __MESH_METRICS_H
#define __MESH_METRICS_H

#include "common.h"

/* Packets and bytes per (reason, direction): index reason * 2 + dir. Reason 0 is forwarded. */
struct metrics_value {
	__u64 packets;            /* 0 */
	__u64 bytes;              /* 8 */
};                            /* 16 bytes */

BPF_TABLE_PINNED("percpu_array", __u32, struct metrics_value, metrics_map, 512, PIN_DIR "/metrics");

/* @reason is a DROP_* (lib/drop_reasons.h) or REASON_FORWARDED; a __u8, so the index stays below
 * the map's 512 entries. */
static __always_inline void update_metrics(__u8 reason, __u8 dir, __u32 len)
{
	__u32 idx = ((__u32)reason << 1) | (dir & 1);
	struct metrics_value *m = metrics_map.lookup(&idx);

	if (m) { /* per-CPU: no atomics needed */
		m->packets += 1;
		m->bytes += len;
	}
}

#endif /* __MESH_METRICS_H */
