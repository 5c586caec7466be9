/* The drop exit of bpf/policy.c, as Cilium's send_drop_notify(): every path that drops a packet
 * ends in `return send_drop_notify(...)`, which counts the drop in metrics_map (lib/metrics.h) and
 * reports it as one EVENT_DROP flow event (lib/events.h) carrying the deciding rule's id.
 */
#ifndef __MESH_DROP_H
#define __MESH_DROP_H

#include "common.h"
#include "drop_reasons.h"
#include "ipv4.h"
#include "events.h"
#include "metrics.h"

/* Whose drop it is, filled by the step that decided it (bpf/policy.c): the endpoint and the
 * direction it is reported for, which is not always the endpoint the program runs for (the L7
 * processor's flow is reported as its client's egress drop), the peer and the rule. */
struct drop_info {
	struct endpoint_info *ep; /* NULL: the packet belongs to no endpoint */
	__u32 remote;             /* the peer's identity, 0 if not known yet */
	__u32 rule_id;            /* the rule that decided, 0 if none */
	__u8  dir;                /* DIR_* seen from ep */
	__u8  is_reply;           /* the packet is a reply of a tracked flow */
};

/**
 * send_drop_notify - count and report a dropped packet
 * @skb:    the packet
 * @p:      what parse_ipv4() learned of it (zero where parsing did not get)
 * @reason: DROP_* (lib/drop_reasons.h): the metric's reason and the event's drop_reason
 * @info:   whose drop it is
 *
 * Returns TC_ACT_SHOT.
 */
static __always_inline int send_drop_notify(struct __sk_buff *skb, struct pkt *p, __u8 reason,
					    struct drop_info *info)
{
	struct flow_event ev = {
		.saddr = p->saddr, .daddr = p->daddr, .sport = p->sport, .dport = p->dport,
		.proto = p->proto, .type = EVENT_DROP, .verdict = VERDICT_DROPPED, .dir = info->dir,
		.drop_reason = reason, .is_reply = info->is_reply, .tcp_flags = p->tcp_flags,
		.ifindex = skb->ifindex, .rule_id = info->rule_id,
	};
	struct endpoint_info *ep = info->ep;

	if (ep) {
		ev.ep_id = ep->ep_id;
		ev.src_identity = info->dir == DIR_EGRESS ? ep->identity : info->remote;
		ev.dst_identity = info->dir == DIR_EGRESS ? info->remote : ep->identity;
	}
	update_metrics(reason, info->dir, skb->len);
	send_flow_event(&ev);
	return TC_ACT_SHOT;
}

#endif /* __MESH_DROP_H */
