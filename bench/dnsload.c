/* dnsload: a DNS-over-UDP load generator for `make bench` (bench/dns.py), and the no-op UDP echo
 * server that measures the generator's own share of the latency. dnsperf is not packaged in Debian.
 *
 *   dnsload echo ADDR PORT
 *   dnsload rate [-w WARMUP] [-d DRAIN] [-e] [-u] ADDR PORT RATE SECONDS NAME...
 *   dnsload peak [-w WARMUP] [-n OUTSTANDING] [-e] [-u] ADDR PORT SECONDS NAME...
 *
 * echo: answers every datagram with itself (prints "ready" once bound). One thread, no parsing:
 * the floor against which a DNS server's latency is read.
 *
 * rate (open loop): A queries (RD set, class IN, no EDNS) for NAME... in turn, one UDP socket
 * connected to ADDR:PORT, query i sent at start + i / RATE whatever the answers do. Latency runs
 * from the *scheduled* send time to the answer's arrival (no coordinated omission). The first WARMUP
 * seconds (default 1) are sent but not recorded. A query still unanswered DRAIN seconds (default 1)
 * after the window is "lost" and recorded with the time it had waited by then (a lower bound).
 *
 * peak (closed loop): OUTSTANDING (default 16) queries in flight; each answer sends the next one. A
 * query unanswered for 1 s is lost and replaced. After WARMUP (default 1), SECONDS are measured.
 *
 * -e accepts echoes (the no-op server) as answers. -u makes every query's name unique
 * (q<counter>.NAME), so a cache never answers it: each query is forwarded. Without -e, an answer is
 * "ok" with QR set, rcode NOERROR and at least one answer record; anything else counts in "errors"
 * (its latency is still recorded). The output is one JSON line:
 *
 *   {"mode": .., "rate": target|0, "seconds": s, "sent": n, "completed": n, "ok": n, "errors": n,
 *    "lost": n, "achieved_rate": .., "p50_us": .., "p90_us": .., "p99_us": .., "p999_us": ..,
 *    "max_us": .., "mean_us": .., "send_lag_p99_us": .., "total_completed": n}
 *
 * Counts other than total_completed cover the measured window; total_completed counts every
 * answer, warm-up and drain included (for the server's CPU per query). send_lag is how late this
 * process sent its queries (timer and scheduling jitter): if large, the generator is the limit.
 * Latencies go into a preallocated log-linear histogram (128 sub-buckets per power of two, < 0.8 %
 * error), as bench/loadgen.c's.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "latency_hist.h"

#define MAX_NAMES 64
#define MAX_MSG   512
#define NIDS      65536
#define LOST_NS   1000000000ull  /* peak: a query unanswered this long is lost */

struct inflight {
	uint64_t sched;  /* scheduled (rate) or actual (peak) send time; 0: free */
	int measured;    /* sent inside the measured window */
};

static struct hist lat, lag;
static struct inflight ids[NIDS];
static char names[MAX_NAMES][256];
static int nnames;
static int echo_ok, unique;
static uint64_t seq, sent, completed, ok, errors, lost, total_completed;

static size_t build_query(uint8_t *buf, uint16_t id, const char *name, uint64_t counter)
{
	char full[300];
	size_t pos = 12;

	if (unique)
		snprintf(full, sizeof(full), "q%llu.%s", (unsigned long long)counter, name);
	else
		snprintf(full, sizeof(full), "%s", name);
	buf[0] = id >> 8;
	buf[1] = id & 0xff;
	buf[2] = 0x01;  /* RD */
	buf[3] = 0;
	buf[4] = 0, buf[5] = 1;  /* QDCOUNT */
	memset(buf + 6, 0, 6);
	for (char *label = full; *label;) {
		char *dot = strchr(label, '.');
		size_t len = dot ? (size_t)(dot - label) : strlen(label);

		buf[pos++] = (uint8_t)len;
		memcpy(buf + pos, label, len);
		pos += len;
		label += len + (dot ? 1 : 0);
	}
	buf[pos++] = 0;
	buf[pos++] = 0, buf[pos++] = 1;  /* QTYPE A */
	buf[pos++] = 0, buf[pos++] = 1;  /* QCLASS IN */
	return pos;
}

static int send_query(int fd, uint64_t sched, int measured)
{
	uint8_t buf[MAX_MSG];
	uint16_t id = (uint16_t)(seq & 0xffff);
	size_t len = build_query(buf, id, names[seq % nnames], seq);

	if (ids[id].sched && ids[id].measured)
		lost++;  /* its id comes round again: it never got an answer */
	ids[id].sched = sched;
	ids[id].measured = measured;
	seq++;
	if (send(fd, buf, len, 0) < 0 && errno != ECONNREFUSED) {
		ids[id].sched = 0;
		return -1;
	}
	if (measured)
		sent++;
	return 0;
}

/* Read every answer waiting; returns how many arrived. */
static int read_answers(int fd)
{
	uint8_t buf[4096];
	int got = 0;

	for (;;) {
		ssize_t n = recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
		uint64_t t = now_ns();

		if (n < 0) {
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				return got;
			if (errno == ECONNREFUSED)  /* an ICMP error from an earlier send */
				continue;
			perror("recv");
			exit(1);
		}
		if (n < 12)
			continue;
		uint16_t id = (uint16_t)(buf[0] << 8 | buf[1]);
		struct inflight *f = &ids[id];

		if (!f->sched)
			continue;  /* late, or a duplicate */
		total_completed++;
		got++;
		if (f->measured) {
			int qr = buf[2] & 0x80, rcode = buf[3] & 0x0f, ancount = buf[6] << 8 | buf[7];

			completed++;
			if (echo_ok || (qr && rcode == 0 && ancount > 0))
				ok++;
			else
				errors++;
			record(&lat, t - f->sched);
		}
		f->sched = 0;
	}
}

static int dial(const char *host, const char *port)
{
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(port))};
	int fd = socket(AF_INET, SOCK_DGRAM, 0), size = 4 << 20;

	if (fd < 0 || inet_pton(AF_INET, host, &sa.sin_addr) != 1) {
		fprintf(stderr, "dnsload: bad address %s\n", host);
		exit(1);
	}
	setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof(size));
	setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof(size));
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		perror("connect");
		exit(1);
	}
	return fd;
}

static void wait_fd(int fd, uint64_t until)
{
	uint64_t now = now_ns();
	struct pollfd p = {.fd = fd, .events = POLLIN};
	struct timespec ts;

	if (until <= now)
		until = now;
	ts.tv_sec = (until - now) / 1000000000ull;
	ts.tv_nsec = (until - now) % 1000000000ull;
	ppoll(&p, 1, &ts, NULL);
}

static void print_result(const char *mode, double rate, double seconds)
{
	printf("{\"mode\": \"%s\", \"rate\": %.0f, \"seconds\": %.3f, \"sent\": %llu, \"completed\": %llu, "
	       "\"ok\": %llu, \"errors\": %llu, \"lost\": %llu, \"achieved_rate\": %.1f, "
	       "\"p50_us\": %.1f, \"p90_us\": %.1f, \"p99_us\": %.1f, \"p999_us\": %.1f, \"max_us\": %.1f, "
	       "\"mean_us\": %.1f, \"send_lag_p99_us\": %.1f, \"total_completed\": %llu}\n",
	       mode, rate, seconds, (unsigned long long)sent, (unsigned long long)completed,
	       (unsigned long long)ok, (unsigned long long)errors, (unsigned long long)lost,
	       completed / seconds, pct_us(&lat, 0.50), pct_us(&lat, 0.90), pct_us(&lat, 0.99),
	       pct_us(&lat, 0.999), lat.max / 1000.0, lat.count ? lat.sum / 1000.0 / lat.count : 0.0,
	       pct_us(&lag, 0.99), (unsigned long long)total_completed);
}

static int run_rate(int fd, double rate, double seconds, double warmup, double drain)
{
	uint64_t start = now_ns() + 1000000, interval = (uint64_t)(1e9 / rate);
	uint64_t measure_from = start + (uint64_t)(warmup * 1e9);
	uint64_t end = measure_from + (uint64_t)(seconds * 1e9);
	uint64_t drain_end = end + (uint64_t)(drain * 1e9), next = start;
	uint64_t i = 0;

	for (;;) {
		uint64_t now = now_ns();

		while (next <= now && next < end) {
			int measured = next >= measure_from;

			if (measured)
				record(&lag, now - next);
			send_query(fd, next, measured);
			next = start + ++i * interval;
		}
		read_answers(fd);
		if (now >= end) {
			int waiting = 0;

			for (unsigned k = 0; k < NIDS; k++)
				waiting += ids[k].sched && ids[k].measured;
			if (!waiting || now >= drain_end)
				break;
			wait_fd(fd, drain_end);
		} else {
			wait_fd(fd, next);
		}
	}
	for (unsigned k = 0; k < NIDS; k++)
		if (ids[k].sched && ids[k].measured) {
			lost++;
			record(&lat, drain_end - ids[k].sched);
		}
	print_result("rate", rate, seconds);
	return 0;
}

static int run_peak(int fd, int outstanding, double seconds, double warmup)
{
	uint64_t measure_from = now_ns() + (uint64_t)(warmup * 1e9);
	uint64_t end = measure_from + (uint64_t)(seconds * 1e9), last_scan = 0;
	int inflight = 0;

	for (;;) {
		uint64_t now = now_ns();

		if (now >= end)
			break;
		while (inflight < outstanding) {
			if (send_query(fd, now, now >= measure_from) == 0)
				inflight++;
			else
				break;
		}
		wait_fd(fd, now + 100000000ull);
		inflight -= read_answers(fd);
		if (now - last_scan > 100000000ull) {  /* lost queries make room for new ones */
			last_scan = now;
			for (unsigned k = 0; k < NIDS; k++)
				if (ids[k].sched && now - ids[k].sched > LOST_NS) {
					lost += ids[k].measured;
					ids[k].sched = 0;
					inflight--;
				}
		}
	}
	print_result("peak", 0, seconds);
	return 0;
}

static int run_echo(const char *host, const char *port)
{
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(port))};
	int fd = socket(AF_INET, SOCK_DGRAM, 0), size = 4 << 20;
	uint8_t buf[4096];

	inet_pton(AF_INET, host, &sa.sin_addr);
	setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof(size));
	if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		perror("bind");
		return 1;
	}
	printf("ready\n");
	fflush(stdout);
	for (;;) {
		struct sockaddr_in peer;
		socklen_t plen = sizeof(peer);
		ssize_t n = recvfrom(fd, buf, sizeof(buf), 0, (struct sockaddr *)&peer, &plen);

		if (n > 0)
			sendto(fd, buf, (size_t)n, 0, (struct sockaddr *)&peer, plen);
	}
}

static void usage(void)
{
	fprintf(stderr, "usage: dnsload echo ADDR PORT\n"
			"       dnsload rate [-w WARMUP] [-d DRAIN] [-e] [-u] ADDR PORT RATE SECONDS NAME...\n"
			"       dnsload peak [-w WARMUP] [-n OUTSTANDING] [-e] [-u] ADDR PORT SECONDS NAME...\n");
	exit(2);
}

int main(int argc, char **argv)
{
	double warmup = 1, drain = 1;
	int outstanding = 16, opt;
	const char *mode;

	if (argc < 2)
		usage();
	mode = argv[1];
	if (!strcmp(mode, "echo"))
		return argc == 4 ? run_echo(argv[2], argv[3]) : (usage(), 2);
	optind = 2;
	while ((opt = getopt(argc, argv, "w:d:n:eu")) != -1) {
		switch (opt) {
		case 'w': warmup = atof(optarg); break;
		case 'd': drain = atof(optarg); break;
		case 'n': outstanding = atoi(optarg); break;
		case 'e': echo_ok = 1; break;
		case 'u': unique = 1; break;
		default: usage();
		}
	}
	prctl(PR_SET_TIMERSLACK, 1UL);  /* wake up on time, not up to 50 us late */
	if (!strcmp(mode, "rate")) {
		if (argc - optind < 5)
			usage();
		for (int k = optind + 4; k < argc && nnames < MAX_NAMES; k++)
			snprintf(names[nnames++], sizeof(names[0]), "%s", argv[k]);
		int fd = dial(argv[optind], argv[optind + 1]);
		return run_rate(fd, atof(argv[optind + 2]), atof(argv[optind + 3]), warmup, drain);
	}
	if (!strcmp(mode, "peak")) {
		if (argc - optind < 4)
			usage();
		for (int k = optind + 3; k < argc && nnames < MAX_NAMES; k++)
			snprintf(names[nnames++], sizeof(names[0]), "%s", argv[k]);
		int fd = dial(argv[optind], argv[optind + 1]);
		return run_peak(fd, outstanding, atof(argv[optind + 2]), warmup);
	}
	usage();
	return 2;
}
