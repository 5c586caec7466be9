/* L3/L4 identity policy: one global LPM trie for all endpoints of the node.
 *
 * Key fields are in network byte order and in this order so that a prefix of the key is a
 * wildcard that makes sense:
 *   ep_id, dir, pad   always matched                      (bits  0..31)
 *   identity          always matched; ANY_IDENTITY (0) is a concrete value, looked up separately
 *                                                         (bits 32..63)
 *   proto, pad2       matched unless the rule is for any protocol   (prefix 64 = any protocol)
 *   dport             matched for the first N bits: N=16 one port, N<16 an aligned block of a
 *                     port range, N=0 any port              (prefix 80 + N)
 * The agent (agent/policy/compiler.py) resolves deny-over-allow when it fills the map, because a
 * longest-prefix lookup returns only the most specific entry per identity.
 *
 * By-address keys: identity = POLICY_BY_ADDRESS | a local CIDR identity of lib/ipcache.h's
 * ipblock_cidrs. They hold the allows of NetworkPolicy ipBlocks for peers matched by address
 * (policy_lookup_by_address) and nothing else, so they never mix with the entries a CIDR rule
 * of a CiliumNetworkPolicy writes for the same prefix. (A flag on shared entries would not do: one
 * key holds one entry, and a CNP deny or a narrower CNP allow of the same CIDR identity would hide
 * the ipBlock's allow from a pod address, or expose a CNP allow to one.)
 */
#ifndef __MESH_POLICY_H
#define __MESH_POLICY_H

#include "common.h"
#include "ipcache.h"

#define ANY_IDENTITY 0
#define POLICY_BY_ADDRESS 0x80000000 /* key identity bit: a by-address entry (see above) */
#define POLICY_FULL_PREFIX 96

#define POLICY_ACTION_ALLOW 1
#define POLICY_ACTION_DENY  2
#define POLICY_F_AUDIT      0x1

/* Policy-verdict match types, as Cilium reports them (meshagent_policy_verdicts_total{match}). */
#define MATCH_NONE     0
#define MATCH_L3_ONLY  1
#define MATCH_L3_L4    2
#define MATCH_L4_ONLY  3
#define MATCH_ALL      4

struct policy_key {
	__u32 prefixlen;          /*  0: LPM prefix length in bits of what follows, 64..96 */
	__u16 ep_id;              /*  4: network order */
	__u8  dir;                /*  6: DIR_INGRESS / DIR_EGRESS */
	__u8  pad;                /*  7 */
	__u32 identity;           /*  8: peer identity, network order; 0 = any */
	__u8  proto;              /* 12: IP protocol */
	__u8  pad2;               /* 13 */
	__u16 dport;              /* 14: network order; ICMP type for ICMP */
};                            /* 16 bytes */

struct policy_entry {
	__u32 rule_id;            /* 0: which policy rule wrote this entry, reported with the verdict */
	__u8  action;             /* 4: POLICY_ACTION_* */
	__u8  flags;              /* 5: POLICY_F_* */
	__u8  match;              /* 6: MATCH_* of the key that holds it, reported as the match type */
	__u8  pad;                /* 7 */
};                            /* 8 bytes */

BPF_TABLE_PINNED("lpm_trie", struct policy_key, struct policy_entry, policy_map, POLICY_MAP_SIZE,
		 PIN_DIR "/policy", BPF_F_NO_PREALLOC);

/* The policy decision for one flow, handed back to the caller. */
struct policy_result {
	__u8  verdict;            /* VERDICT_FORWARDED, VERDICT_DROPPED or VERDICT_AUDIT */
	__u8  drop_reason;        /* DROP_POLICY (default deny) or DROP_POLICY_DENY (deny rule) */
	__u8  match;              /* MATCH_* */
	__u8  pad;
	__u32 rule_id;
};

static __always_inline struct policy_entry *
__policy_lookup(__u16 ep_id, __u8 dir, __u32 identity, __u8 proto, __u16 dport)
{
	struct policy_key key = {
		.prefixlen = POLICY_FULL_PREFIX,
		.ep_id = bpf_htons(ep_id),
		.dir = dir,
		.identity = bpf_htonl(identity),
		.proto = proto,
		.dport = bpf_htons(dport),
	};

	return policy_map.lookup(&key);
}

/**
 * policy_lookup_by_address - the NetworkPolicy ipBlock allow that holds a peer's address
 * @ep_id:    the local endpoint
 * @dir:      DIR_*, seen from the endpoint
 * @identity: the peer's identity (from the ipcache, or a proxy mark)
 * @addr:     the peer's address, network order; 0 = not known (an identity-only proxy mark)
 * @proto:    IP protocol
 * @dport:    destination port of the flow's original direction
 *
 * Only for a peer whose identity is its own (an endpoint, host, remote-node): a world or CIDR
 * identity came from the address already, and its entries hold the ipBlocks' allows. Costs one
 * LPM lookup in ipblock_cidrs, which returns at once while that trie is empty (no ipBlock), so
 * no config flag gates it; the caller asks only when the flow would otherwise not be allowed.
 *
 * Returns the by-address entry, or NULL.
 */
static __always_inline struct policy_entry *
policy_lookup_by_address(__u16 ep_id, __u8 dir, __u32 identity, __u32 addr, __u8 proto, __u16 dport)
{
	__u32 block;

	if (!addr || identity == IDENTITY_WORLD || identity >= IDENTITY_CIDR_BASE)
		return 0;
	block = ipblock_lookup_identity(addr);
	if (!block)
		return 0;
	return __policy_lookup(ep_id, dir, block | POLICY_BY_ADDRESS, proto, dport);
}

/**
 * policy_can_access - decide a new flow of an endpoint
 * @ep:       the local endpoint
 * @dir:      DIR_INGRESS or DIR_EGRESS, seen from @ep
 * @identity: the peer's identity
 * @addr:     the peer's address, network order (0 = not known): NetworkPolicy ipBlocks match it
 * @proto:    IP protocol
 * @dport:    destination port of the flow's original direction (ICMP type for ICMP)
 * @res:      out: verdict, drop reason, match type and the deciding rule id
 *
 * Deny entries beat allow entries; an allow of the peer's identity, of any identity, or of an
 * ipBlock holding the peer's address (in that order) admits; an audit deny (or an audited default
 * deny) passes with VERDICT_AUDIT. The same algorithm in Python is agent/policy/lookup.py
 * (`meshagent policy trace`).
 */
static __always_inline void policy_can_access(struct endpoint_info *ep, __u8 dir, __u32 identity, __u32 addr,
					      __u8 proto, __u16 dport, struct policy_result *res)
{
	__u8 enforce = dir == DIR_INGRESS ? EP_F_ENFORCE_INGRESS : EP_F_ENFORCE_EGRESS;
	__u8 audit = dir == DIR_INGRESS ? EP_F_AUDIT_INGRESS : EP_F_AUDIT_EGRESS;
	struct policy_entry *l3, *any, *by_addr, *audited;

	res->rule_id = 0;
	res->drop_reason = 0;
	if (!(ep->flags & enforce)) {
		res->verdict = VERDICT_FORWARDED;
		res->match = MATCH_NONE;
		return;
	}

	l3 = __policy_lookup(ep->ep_id, dir, identity, proto, dport);
	any = __policy_lookup(ep->ep_id, dir, ANY_IDENTITY, proto, dport);

	if (l3 && l3->action == POLICY_ACTION_DENY && !(l3->flags & POLICY_F_AUDIT)) {
		res->verdict = VERDICT_DROPPED;
		res->drop_reason = DROP_POLICY_DENY;
		res->rule_id = l3->rule_id;
		res->match = l3->match;
		return;
	}
	if (any && any->action == POLICY_ACTION_DENY && !(any->flags & POLICY_F_AUDIT)) {
		res->verdict = VERDICT_DROPPED;
		res->drop_reason = DROP_POLICY_DENY;
		res->rule_id = any->rule_id;
		res->match = any->match;
		return;
	}
	if (l3 && l3->action == POLICY_ACTION_ALLOW) {
		res->verdict = VERDICT_FORWARDED;
		res->rule_id = l3->rule_id;
		res->match = l3->match;
		return;
	}
	if (any && any->action == POLICY_ACTION_ALLOW) {
		res->verdict = VERDICT_FORWARDED;
		res->rule_id = any->rule_id;
		res->match = any->match;
		return;
	}
	by_addr = policy_lookup_by_address(ep->ep_id, dir, identity, addr, proto, dport);
	if (by_addr && by_addr->action == POLICY_ACTION_ALLOW) {
		res->verdict = VERDICT_FORWARDED;
		res->rule_id = by_addr->rule_id;
		res->match = by_addr->match;
		return;
	}
	/* Only audit denies matched. Verifier workaround: with the by-address lookup above, clang
	 * turned `if (l3 || any)` into an OR of the two pointers, which the verifier refuses
	 * ("pointer |= pointer prohibited"); one pointer picked by a branch is fine. */
	audited = l3 ? l3 : any;
	if (audited) {
		res->verdict = VERDICT_AUDIT;
		res->drop_reason = DROP_POLICY_DENY;
		res->rule_id = audited->rule_id;
		res->match = audited->match;
		return;
	}
	/* Default deny: name the policy that put the endpoint under enforcement. */
	res->verdict = (ep->flags & audit) ? VERDICT_AUDIT : VERDICT_DROPPED;
	res->drop_reason = DROP_POLICY;
	res->rule_id = dir == DIR_INGRESS ? ep->deny_rule_ingress : ep->deny_rule_egress;
	res->match = MATCH_NONE;
}

/**
 * policy_can_access_proxied - decide a flow the L7 processor opens to @ep for a local client
 * @client: the client endpoint the processor's mark names (MARK_MAGIC_PROXY_EGRESS)
 * @ep:     the endpoint the flow is delivered to: the backend the processor picked
 * @proto:  IP protocol
 * @dport:  the backend's port (the port a direct connection would have had)
 * @res:    out: the decision of the side that decided, as policy_can_access() gives it
 *
 * Both sides must admit the flow, as if the client had connected to the backend itself: @client's
 * egress policy towards @ep's identity and address, and @ep's ingress policy from @client's
 * identity and address. The client's side is looked at first, so a flow both sides deny is
 * reported as the client's.
 *
 * Returns DIR_EGRESS if @client's egress policy decided @res (it dropped the flow, or admitted it
 * only as an audit), DIR_INGRESS if @ep's ingress policy did.
 */
static __always_inline __u8 policy_can_access_proxied(struct endpoint_info *client,
						      struct endpoint_info *ep, __u8 proto,
						      __u16 dport, struct policy_result *res)
{
	struct policy_result in = {};

	policy_can_access(client, DIR_EGRESS, ep->identity, ep->ip, proto, dport, res);
	if (res->verdict == VERDICT_DROPPED)
		return DIR_EGRESS;
	policy_can_access(ep, DIR_INGRESS, client->identity, client->ip, proto, dport, &in);
	if (in.verdict == VERDICT_FORWARDED && res->verdict == VERDICT_AUDIT)
		return DIR_EGRESS; /* the backend allows it; only the client's audit mode let it out */
	*res = in;
	return DIR_INGRESS;
}

#endif /* __MESH_POLICY_H */
