/* Flow events to user space: the event struct (mirrored by agent/datapath/maps.py FlowEventC and
 * decoded by agent/flows.py) and the ring buffer.
 *
 * Every event the datapath reports is written by send_flow_event(), called from the notify
 * helpers: send_drop_notify() (lib/drop.h) for drops, send_flow_new_notify() and
 * send_flow_end_notify() (lib/trace.h) for flows. A full ring buffer never blocks the datapath:
 * the event is counted in lost_events and `meshagent flows` reports the gap.
 */
#ifndef __MESH_EVENTS_H
#define __MESH_EVENTS_H

#include "common.h"

#define EVENT_FLOW_NEW  1 /* first packet of a flow passed (or was audited) */
#define EVENT_DROP      2 /* a packet was dropped */
#define EVENT_FLOW_END  3 /* a TCP flow closed (RST, or FIN both ways); carries its counters */

struct flow_event {
	__u64 ts_ns;              /*  0: bpf_ktime_get_ns */
	__u32 saddr;              /*  8: network order */
	__u32 daddr;              /* 12 */
	__u16 sport;              /* 16: host order */
	__u16 dport;              /* 18 */
	__u8  proto;              /* 20 */
	__u8  type;               /* 21: EVENT_* */
	__u8  verdict;            /* 22: VERDICT_* */
	__u8  dir;                /* 23: DIR_* seen from the endpoint */
	__u8  drop_reason;        /* 24: drop_reasons.h, 0 if not dropped */
	__u8  is_reply;           /* 25 */
	__u8  tcp_flags;          /* 26 */
	__u8  match;              /* 27: MATCH_* */
	__u16 ep_id;              /* 28 */
	__u16 pad;                /* 30 */
	__u32 ifindex;            /* 32 */
	__u32 src_identity;       /* 36 */
	__u32 dst_identity;       /* 40 */
	__u32 rule_id;            /* 44 */
	__u64 packets;            /* 48: FLOW_END: packets both ways */
	__u64 bytes;              /* 56: FLOW_END: bytes both ways */
};                            /* 64 bytes */

/* 256 KiB: about 4,000 events in flight before the agent must have read some. */
BPF_RINGBUF_OUTPUT(events, 64);

BPF_TABLE_PINNED("percpu_array", __u32, __u64, lost_events, 1, PIN_DIR "/lost_events");

static __always_inline void send_flow_event(struct flow_event *ev)
{
	int err;

	ev->ts_ns = bpf_ktime_get_ns();
	/* No wakeup per event: the agent drains the ring on a timer, so a burst of new flows costs
	 * no scheduler work in the datapath. BCC code generation: test the helper's result through
	 * a variable (KERNEL-NOTES). */
	err = events.ringbuf_output(ev, sizeof(*ev), BPF_RB_NO_WAKEUP);
	if (err) {
		__u32 zero = 0;
		__u64 *lost = lost_events.lookup(&zero);

		if (lost)
			*lost += 1;
	}
}

#endif /* __MESH_EVENTS_H */
