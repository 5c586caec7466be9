/* Latency histograms of the bench's load generators (bench/loadgen.c, bench/dnsload.c): HDR-style
 * buckets, 128 per power of two (relative error < 1%), up to 2^55 ns; percentiles in microseconds.
 * Header-only, included by both. */
#ifndef MESHAGENT_BENCH_LATENCY_HIST_H
#define MESHAGENT_BENCH_LATENCY_HIST_H

#include <stdint.h>
#include <time.h>

#define SUB_BITS     7
#define SUB          (1u << SUB_BITS)                /* 128 sub-buckets per power of two */
#define NBUCKETS     (2 * SUB + 48 * SUB)

struct hist {
	uint64_t n[NBUCKETS];
	uint64_t count, max, sum;
};

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static unsigned bucket_of(uint64_t v)
{
	if (v < 2 * SUB)
		return (unsigned)v;
	unsigned e = 63 - (unsigned)__builtin_clzll(v);     /* >= SUB_BITS + 1 */
	unsigned shift = e - SUB_BITS;
	unsigned idx = 2 * SUB + (e - SUB_BITS - 1) * SUB + (unsigned)((v >> shift) - SUB);

	return idx < NBUCKETS ? idx : NBUCKETS - 1;
}

static double bucket_mid(unsigned idx)
{
	if (idx < 2 * SUB)
		return idx + 0.5;
	unsigned e = (idx - 2 * SUB) / SUB + SUB_BITS + 1;
	unsigned shift = e - SUB_BITS;
	uint64_t m = SUB + (idx - 2 * SUB) % SUB;

	return ((double)(m << shift) + (double)((m + 1) << shift)) / 2;
}

static void record(struct hist *h, uint64_t v)
{
	h->n[bucket_of(v)]++;
	h->count++;
	h->sum += v;
	if (v > h->max)
		h->max = v;
}

static double pct_us(const struct hist *h, double q)
{
	uint64_t rank, seen = 0;

	if (!h->count)
		return 0;
	rank = (uint64_t)(q * (double)h->count);
	if (rank >= h->count)
		rank = h->count - 1;
	for (unsigned i = 0; i < NBUCKETS; i++) {
		seen += h->n[i];
		if (seen > rank) {
			double mid = bucket_mid(i);

			return (mid > (double)h->max ? (double)h->max : mid) / 1000.0;
		}
	}
	return h->max / 1000.0;
}

#endif /* MESHAGENT_BENCH_LATENCY_HIST_H */
