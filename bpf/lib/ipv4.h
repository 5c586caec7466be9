/* Parsing: what an IPv4 packet and its L4 header say, for conntrack and policy.
 *
 * Headers are copied to the stack (load_header), so no packet pointer outlives a helper call and
 * nothing needs revalidating afterwards (the verifier invalidates packet pointers across helpers
 * that may change the packet; Cilium calls revalidate_data() instead).
 *
 * Fragments: the first fragment carries the ports; later ones find them in frag_map by IP id.
 */
#ifndef __MESH_IPV4_H
#define __MESH_IPV4_H

#include "common.h"
#include "drop_reasons.h"

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04

#define ICMP_ECHOREPLY 0
#define ICMP_ECHO      8

#define IP_MF     0x2000
#define IP_OFFSET 0x1fff

/* What the parser learned about a packet. */
struct pkt {
	__u32 saddr, daddr;       /* network order */
	__u16 sport, dport;       /* host order: conntrack tuple */
	__u16 policy_port;        /* port the policy looks at: dport, or the ICMP type */
	__u8  proto;
	__u8  tcp_flags;
	__u32 len;
};

struct frag_key {
	__u32 saddr;              /* 0 */
	__u32 daddr;              /* 4 */
	__u16 id;                 /* 8: IP identification */
	__u8  proto;              /* 10 */
	__u8  pad;                /* 11 */
};                            /* 12 bytes */

struct frag_ports {
	__u16 sport;              /* 0 */
	__u16 dport;              /* 2 */
};                            /* 4 bytes */

BPF_TABLE_PINNED("lru_hash", struct frag_key, struct frag_ports, frag_map, 8192, PIN_DIR "/frag");

/* Copy a header at @off into @dst: straight from the linear packet data when it is all there
 * (the common case; no helper call), else through bpf_skb_load_bytes() for non-linear skbs.
 * Evaluates to 0 or a negative error. A macro so the copy size is a compile-time constant. */
#define load_header(skb, off, dst) ({						\
	void *__data = (void *)(long)(skb)->data;				\
	void *__end = (void *)(long)(skb)->data_end;				\
	int __ret = 0;								\
	if (__data + (off) + sizeof(*(dst)) <= __end)				\
		__builtin_memcpy((dst), __data + (off), sizeof(*(dst)));	\
	else									\
		__ret = bpf_skb_load_bytes((skb), (off), (dst), sizeof(*(dst)));\
	__ret;									\
})

/**
 * parse_ipv4 - read the IPv4 header and the L4 ports of @skb
 * @skb: the packet
 * @p:   out: addresses, ports, protocol, TCP flags and length; filled as far as parsing got, so a
 *       drop of a packet that failed half way still reports its addresses
 *
 * ICMP echo request and reply carry their id as both ports, other ICMP types their type as sport;
 * a later fragment takes the ports its first fragment recorded in frag_map.
 *
 * Returns 0, or the DROP_* reason: DROP_UNKNOWN_L3 for a packet that is not IPv4.
 */
static __always_inline int parse_ipv4(struct __sk_buff *skb, struct pkt *p)
{
	struct iphdr ip;
	__u32 l4_off;
	__u16 frag;

	if (skb->protocol != bpf_htons(ETH_P_IP))
		return DROP_UNKNOWN_L3;
	if (load_header(skb, ETH_HLEN, &ip) < 0)
		return DROP_INVALID;
	if (ip.version != 4 || ip.ihl < 5)
		return DROP_INVALID;

	p->saddr = ip.saddr;
	p->daddr = ip.daddr;
	p->proto = ip.protocol;
	p->len = skb->len;
	p->sport = p->dport = p->policy_port = 0;
	p->tcp_flags = 0;
	l4_off = ETH_HLEN + ip.ihl * 4;
	frag = bpf_ntohs(ip.frag_off);

	if (frag & IP_OFFSET) {
		/* A later fragment: no L4 header; take the ports its first fragment recorded. */
		struct frag_key fk = { .saddr = ip.saddr, .daddr = ip.daddr, .id = ip.id, .proto = ip.protocol };
		struct frag_ports *fp = frag_map.lookup(&fk);

		if (!fp)
			return DROP_FRAG_NOT_FOUND;
		p->sport = fp->sport;
		p->dport = fp->dport;
		p->policy_port = fp->dport;
		return 0;
	}

	switch (ip.protocol) {
	case IPPROTO_TCP: {
		__u8 hdr[14]; /* ports (4), seq (4), ack (4), data offset (1), flags (1) */

		if (load_header(skb, l4_off, &hdr) < 0)
			return DROP_CT_INVALID_HDR;
		if ((hdr[12] >> 4) < 5)
			return DROP_CT_INVALID_HDR;
		p->sport = (hdr[0] << 8) | hdr[1];
		p->dport = (hdr[2] << 8) | hdr[3];
		p->tcp_flags = hdr[13];
		p->policy_port = p->dport;
		break;
	}
	case IPPROTO_UDP:
	case IPPROTO_SCTP: {
		__u8 ports[4];

		if (load_header(skb, l4_off, &ports) < 0)
			return DROP_CT_INVALID_HDR;
		p->sport = (ports[0] << 8) | ports[1];
		p->dport = (ports[2] << 8) | ports[3];
		p->policy_port = p->dport;
		break;
	}
	case IPPROTO_ICMP: {
		__u8 icmp[8]; /* type, code, checksum, id, sequence */

		if (load_header(skb, l4_off, &icmp) < 0)
			return DROP_CT_INVALID_HDR;
		p->policy_port = icmp[0];
		if (icmp[0] == ICMP_ECHO || icmp[0] == ICMP_ECHOREPLY) {
			/* Request and reply carry the same id: use it as both ports so the reversed
			 * tuple of a reply finds the request's entry. */
			p->sport = p->dport = (icmp[4] << 8) | icmp[5];
		} else {
			p->sport = icmp[0];
		}
		break;
	}
	default:
		/* Other protocols have no ports: policy sees them as (proto, port 0). */
		break;
	}

	if (frag & IP_MF) {
		struct frag_key fk = { .saddr = ip.saddr, .daddr = ip.daddr, .id = ip.id, .proto = ip.protocol };
		struct frag_ports fp = { .sport = p->sport, .dport = p->dport };

		frag_map.update(&fk, &fp);
	}
	return 0;
}

#endif /* __MESH_IPV4_H */
