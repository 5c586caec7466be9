/* rr: a small netperf TCP_RR / TCP_CRR look-alike for `make bench`.
 *
 *   rr server PORT                              echo every byte back, one thread per connection
 *   rr client HOST PORT SECONDS [MSGSIZE]       TCP_RR: one connection, MSGSIZE-byte request,
 *                                               wait for the whole reply, repeat for SECONDS
 *   rr crr HOST PORT SECONDS [MSGSIZE]          TCP_CRR: connect, one request/response, close,
 *                                               repeat (every transaction is a new flow)
 *
 * The client prints one JSON line:
 *   {"mode": "rr", "transactions": n, "seconds": s, "rate": tps, "p50_us": .., "p99_us": ..}
 *
 * Latencies go into a preallocated histogram (100 ns buckets up to 100 ms, plus an overflow
 * bucket), so the timed loop never allocates. Exit 1 with a message on stderr on any error: a
 * connection that a policy drops shows up as a timeout, not as a hang.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_MSG        65536
#define BUCKET_NS      100
#define NBUCKETS       1000000          /* 100 ns x 1e6 = 100 ms */
#define IO_TIMEOUT_S   5

static uint32_t hist[NBUCKETS + 1];     /* last bucket: everything >= 100 ms */

static void die(const char *what)
{
	fprintf(stderr, "rr: %s: %s\n", what, strerror(errno));
	exit(1);
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static int write_all(int fd, const char *buf, size_t len)
{
	while (len) {
		ssize_t n = write(fd, buf, len);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		buf += n;
		len -= (size_t)n;
	}
	return 0;
}

static int read_all(int fd, char *buf, size_t len)
{
	while (len) {
		ssize_t n = read(fd, buf, len);

		if (n == 0) {
			errno = ECONNRESET;
			return -1;
		}
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		buf += n;
		len -= (size_t)n;
	}
	return 0;
}

/* ---- server ------------------------------------------------------------------------------- */

static void *echo_conn(void *arg)
{
	int fd = (int)(intptr_t)arg;
	int one = 1;
	char buf[MAX_MSG];
	ssize_t n;

	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	/* Echo whatever arrives: the client knows the message size and waits for all of it. */
	while ((n = read(fd, buf, sizeof(buf))) > 0 || (n < 0 && errno == EINTR)) {
		if (n > 0 && write_all(fd, buf, (size_t)n) < 0)
			break;
	}
	close(fd);
	return NULL;
}

static void __attribute__((noreturn)) server(int port)
{
	struct sockaddr_in addr = { .sin_family = AF_INET, .sin_port = htons(port),
				    .sin_addr.s_addr = htonl(INADDR_ANY) };
	int one = 1;
	int lfd = socket(AF_INET, SOCK_STREAM, 0);
	pthread_attr_t attr;

	if (lfd < 0)
		die("socket");
	setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(lfd, (struct sockaddr *)&addr, sizeof(addr)) < 0)
		die("bind");
	if (listen(lfd, 1024) < 0)
		die("listen");
	signal(SIGPIPE, SIG_IGN);
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	pthread_attr_setstacksize(&attr, 256 * 1024);
	for (;;) {
		pthread_t t;
		int fd = accept(lfd, NULL, NULL);

		if (fd < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			die("accept");
		}
		if (pthread_create(&t, &attr, echo_conn, (void *)(intptr_t)fd) != 0)
			close(fd);
	}
}

/* ---- client ------------------------------------------------------------------------------- */

static int dial(const struct sockaddr_in *addr)
{
	struct timeval tv = { .tv_sec = IO_TIMEOUT_S };
	int one = 1;
	int fd = socket(AF_INET, SOCK_STREAM, 0);

	if (fd < 0)
		die("socket");
	/* SO_SNDTIMEO also bounds connect(); SO_RCVTIMEO bounds each wait for a reply. */
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (connect(fd, (const struct sockaddr *)addr, sizeof(*addr)) < 0)
		die("connect");
	return fd;
}

/* TCP_CRR closes with a reset (linger 0), as the client would otherwise leave one TIME_WAIT
 * socket per transaction and run out of ephemeral ports within seconds. */
static void close_reset(int fd)
{
	struct linger lg = { .l_onoff = 1, .l_linger = 0 };

	setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
	close(fd);
}

static double percentile_us(uint64_t count, double q)
{
	uint64_t rank = (uint64_t)(q * (double)count);
	uint64_t seen = 0;

	if (rank >= count)
		rank = count - 1;
	for (size_t i = 0; i <= NBUCKETS; i++) {
		seen += hist[i];
		if (seen > rank)
			return (i + 0.5) * BUCKET_NS / 1000.0;   /* bucket midpoint */
	}
	return NBUCKETS * BUCKET_NS / 1000.0;
}

static int client(const char *host, int port, double seconds, size_t msgsize, int crr)
{
	struct sockaddr_in addr = { .sin_family = AF_INET, .sin_port = htons(port) };
	static char msg[MAX_MSG], reply[MAX_MSG];
	uint64_t start, deadline, t0, t1, count = 0;
	int fd = -1;

	if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) {
		fprintf(stderr, "rr: %s is not an IPv4 address\n", host);
		return 2;
	}
	signal(SIGPIPE, SIG_IGN);
	memset(msg, 'r', msgsize);
	if (!crr)
		fd = dial(&addr);
	start = t0 = now_ns();
	deadline = start + (uint64_t)(seconds * 1e9);
	do {
		if (crr)
			fd = dial(&addr);
		if (write_all(fd, msg, msgsize) < 0)
			die("write");
		if (read_all(fd, reply, msgsize) < 0)
			die("read");
		if (crr)
			close_reset(fd);
		t1 = now_ns();
		uint64_t bucket = (t1 - t0) / BUCKET_NS;
		hist[bucket < NBUCKETS ? bucket : NBUCKETS]++;
		count++;
		t0 = t1;
	} while (t1 < deadline);
	if (!crr)
		close(fd);

	double elapsed = (t1 - start) / 1e9;
	printf("{\"mode\": \"%s\", \"transactions\": %llu, \"seconds\": %.3f, \"rate\": %.1f, "
	       "\"p50_us\": %.1f, \"p99_us\": %.1f}\n",
	       crr ? "crr" : "rr", (unsigned long long)count, elapsed, count / elapsed,
	       percentile_us(count, 0.50), percentile_us(count, 0.99));
	return 0;
}

static void usage(void)
{
	fprintf(stderr,
		"usage: rr server PORT\n"
		"       rr client HOST PORT SECONDS [MSGSIZE]   (TCP_RR, one connection)\n"
		"       rr crr HOST PORT SECONDS [MSGSIZE]      (TCP_CRR, a connection per transaction)\n");
	exit(2);
}

int main(int argc, char **argv)
{
	if (argc == 3 && !strcmp(argv[1], "server"))
		server(atoi(argv[2]));
	if ((argc == 5 || argc == 6) && (!strcmp(argv[1], "client") || !strcmp(argv[1], "crr"))) {
		double seconds = atof(argv[4]);
		long msgsize = argc == 6 ? atol(argv[5]) : 1;

		if (seconds <= 0 || msgsize < 1 || msgsize > MAX_MSG)
			usage();
		return client(argv[2], atoi(argv[3]), seconds, (size_t)msgsize, !strcmp(argv[1], "crr"));
	}
	usage();
	return 2;
}
