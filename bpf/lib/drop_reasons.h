/* Drop reasons: one numbering for metrics, flow events and `meshagent flows`.
 *
 * Mirrored by agent/datapath/reasons.py (DROP_REASONS); tests/unit/test_reasons.py parses this file
 * and fails if the two drift. Numbers follow Cilium's where the meaning is the same and are never
 * reused: retire a reason by renaming it DROP_UNUSED_<n>. The comment after each number is the
 * name `meshagent flows` prints as drop_reason_desc (Hubble's names).
 *
 * Policy decisions: a reason that is a policy's verdict (counted in meshagent_policy_verdicts_total,
 * agent/flows.py) is named DROP_POLICY* and its printed name starts with POLICY_; every other
 * reason (parsing, anti-spoofing, lookups) is named neither way. reasons.py derives its
 * POLICY_DROP_REASONS from that rule and the test checks the rule holds here.
 */
#ifndef __MESH_DROP_REASONS_H
#define __MESH_DROP_REASONS_H

#define REASON_FORWARDED        0   /* FORWARDED */
#define DROP_INVALID_SIP        132 /* INVALID_SOURCE_IP */
#define DROP_POLICY             133 /* POLICY_DENIED */
#define DROP_INVALID            134 /* INVALID_PACKET_DROPPED */
#define DROP_CT_INVALID_HDR     135 /* CT_TRUNCATED_OR_INVALID_HEADER */
#define DROP_UNKNOWN_L3         139 /* UNSUPPORTED_L3_PROTOCOL */
#define DROP_NO_ENDPOINT        145 /* ENDPOINT_NOT_FOUND */
#define DROP_FRAG_NOT_FOUND     155 /* FRAGMENT_NOT_FOUND */
#define DROP_POLICY_DENY        181 /* POLICY_DENY */
#define DROP_POLICY_REVOKED     182 /* POLICY_REVOKED */
/* The L7 processor's connection for a client: denied by that client's egress policy. */
#define DROP_POLICY_CLIENT_EGRESS 183 /* POLICY_DENIED_CLIENT_EGRESS */

#endif /* __MESH_DROP_REASONS_H */
