/* The forward exit of bpf/policy.c, as Cilium's send_trace_notify(): every packet that passes
 * ends in `return send_trace_notify(...)`, which counts it in metrics_map (REASON_FORWARDED).
 * A flow's first packet and its close are also reported as flow events (lib/events.h);
 * established packets are not.
 */
#ifndef __MESH_TRACE_H
#define __MESH_TRACE_H

#include "common.h"
#include "drop_reasons.h"
#include "ipv4.h"
#include "policy.h"
#include "conntrack.h"
#include "events.h"
#include "metrics.h"

/* Count a forwarded packet. Returns TC_ACT_OK. */
static __always_inline int send_trace_notify(struct __sk_buff *skb, __u8 dir)
{
	update_metrics(REASON_FORWARDED, dir, skb->len);
	return TC_ACT_OK;
}

/**
 * send_flow_new_notify - report the first packet of a flow that policy let through
 * @skb:    the packet
 * @ep:     the endpoint the program runs for
 * @dir:    DIR_* of the packet, seen from @ep
 * @p:      the parsed packet
 * @res:    the policy decision: VERDICT_FORWARDED, VERDICT_AUDIT (with the drop reason it would
 *          have had) or VERDICT_REDIRECTED, the match type and the deciding rule
 * @remote: the peer's identity
 */
static __always_inline void send_flow_new_notify(struct __sk_buff *skb, struct endpoint_info *ep, __u8 dir,
						 struct pkt *p, struct policy_result *res, __u32 remote)
{
	struct flow_event ev = {
		.saddr = p->saddr, .daddr = p->daddr, .sport = p->sport, .dport = p->dport,
		.proto = p->proto, .type = EVENT_FLOW_NEW, .verdict = res->verdict, .dir = dir,
		.drop_reason = res->verdict == VERDICT_AUDIT ? res->drop_reason : 0,
		.tcp_flags = p->tcp_flags, .match = res->match, .ep_id = ep->ep_id,
		.ifindex = skb->ifindex, .rule_id = res->rule_id,
		.packets = 1, .bytes = p->len,
	};

	ev.src_identity = dir == DIR_EGRESS ? ep->identity : remote;
	ev.dst_identity = dir == DIR_EGRESS ? remote : ep->identity;
	send_flow_event(&ev);
}

/**
 * send_flow_end_notify - report a TCP flow that closed (ct_track_close), with its counters
 * @skb:       the packet that closed it
 * @ep:        the endpoint the program runs for
 * @key:       the tuple the flow's entry was created under: the flow's original direction
 * @ct:        its entry
 * @tcp_flags: the closing packet's TCP flags
 */
static __always_inline void send_flow_end_notify(struct __sk_buff *skb, struct endpoint_info *ep,
						 struct ct_key *key, struct ct_entry *ct, __u8 tcp_flags)
{
	struct flow_event ev = {
		.saddr = key->saddr, .daddr = key->daddr, .sport = key->sport, .dport = key->dport,
		.proto = key->proto, .type = EVENT_FLOW_END,
		.verdict = (ct->flags & CT_F_REDIRECT) ? VERDICT_REDIRECTED :
			   (ct->flags & CT_F_AUDIT) ? VERDICT_AUDIT : VERDICT_FORWARDED,
		.dir = key->dir, .tcp_flags = tcp_flags, .ep_id = ep->ep_id,
		.ifindex = skb->ifindex, .rule_id = ct->rule_id,
		.packets = ct->packets_fwd + ct->packets_rev,
		.bytes = ct->bytes_fwd + ct->bytes_rev,
	};

	ev.src_identity = key->dir == DIR_EGRESS ? ep->identity : ct->remote_identity;
	ev.dst_identity = key->dir == DIR_EGRESS ? ct->remote_identity : ep->identity;
	send_flow_event(&ev);
}

#endif /* __MESH_TRACE_H */
