/* loadgen: an open-loop, constant-rate HTTP/1.1 load generator for `make bench` (wrk2-style; wrk2
 * is not packaged in Debian).
 *
 *   loadgen [-w WARMUP] [-d DRAIN] [-H HOST] [-p PATH] ADDR PORT RATE SECONDS CONNECTIONS
 *
 * CONNECTIONS keep-alive connections to ADDR:PORT (IPv4) share one fixed schedule of RATE requests
 * per second: connection k sends its j-th request at start + (j * CONNECTIONS + k) / RATE, so the
 * sends of all connections are evenly spaced. A request goes out at its scheduled time, or as soon
 * as the connection's previous response is complete if that is later (no pipelining). Latency is
 * measured from the *scheduled* send time to the last byte of the response, so a server that falls
 * behind is charged for the queueing it causes (no coordinated omission).
 *
 * The first WARMUP seconds (default 1) are sent but not recorded; then SECONDS are measured. Every
 * request scheduled in the measured window is recorded: those still unsent or unanswered DRAIN
 * seconds (default 2) after the window ends are recorded with the time they had waited by then (a
 * lower bound) and counted as "unfinished". The output is one JSON line:
 *
 *   {"rate": target, "achieved_rate": .., "connections": n, "seconds": s, "scheduled": n,
 *    "completed": n, "unfinished": n, "errors": n, "non_2xx": n, "reconnects": n,
 *    "p50_us": .., "p90_us": .., "p99_us": .., "p999_us": .., "max_us": .., "mean_us": ..,
 *    "send_lag_p99_us": .., "total_completed": n}
 *
 * total_completed counts every response, warm-up and drain included (for CPU per request).
 * send_lag is how late the generator itself sent requests whose connection was idle (timer and
 * scheduling jitter of this process): if it is large, the generator, not the server, is the limit.
 * Latencies go into a preallocated log-linear histogram (128 sub-buckets per power of two, < 0.8 %
 * error), so the timed loop never allocates. Responses must carry Content-Length (no chunked).
 * Exit 1 with a message on stderr when it cannot connect.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "latency_hist.h"

#define BUF_SIZE     16384
#define MAX_CONNS    4096

struct conn {
	int fd;
	int busy;            /* a request is in flight */
	uint64_t j;          /* index of this connection's next request */
	uint64_t sched;      /* scheduled send time of the request in flight */
	uint64_t idle_since; /* when the last response completed */
	size_t wpos;         /* bytes of the request written */
	size_t len;          /* bytes buffered from the response */
	char buf[BUF_SIZE];
};

static struct hist lat, lag;
static struct conn *conns;
static int nconns;
static struct sockaddr_in addr;
static char request[1024];
static size_t request_len;
static int epfd;
static uint64_t errors, non2xx, reconnects, total_completed;

static int dial(struct conn *c)
{
	int one = 1;
	struct timeval tv = { .tv_sec = 5 };
	struct epoll_event ev = { .events = EPOLLIN };
	int fd = socket(AF_INET, SOCK_STREAM, 0);

	if (fd < 0)
		return -1;
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));   /* bounds the blocking connect */
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0 ||
	    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) < 0) {
		close(fd);
		return -1;
	}
	ev.data.ptr = c;
	if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
		close(fd);
		return -1;
	}
	c->fd = fd;
	c->busy = 0;
	c->len = 0;
	c->wpos = 0;
	return 0;
}

/* The connection failed (reset, EOF, garbage): the request in flight is an error; reconnect. */
static void fail(struct conn *c)
{
	errors++;
	epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
	close(c->fd);
	c->fd = -1;
	c->busy = 0;
	reconnects++;
	if (dial(c) < 0)
		c->fd = -1;     /* stays dead; its schedule is counted as unfinished */
}

static void flush_write(struct conn *c)
{
	while (c->wpos < request_len) {
		ssize_t n = write(c->fd, request + c->wpos, request_len - c->wpos);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN) {
				struct epoll_event ev = { .events = EPOLLIN | EPOLLOUT, .data.ptr = c };

				epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
				return;
			}
			fail(c);
			return;
		}
		c->wpos += (size_t)n;
	}
}

/* Parse a complete response in c->buf: returns its total length, 0 if incomplete, -1 if bad. */
static long response_length(struct conn *c, int *status)
{
	char *end = memmem(c->buf, c->len, "\r\n\r\n", 4);
	long head, clen = -1;

	if (!end)
		return c->len >= BUF_SIZE ? -1 : 0;
	head = end - c->buf + 4;
	if (c->len < 12 || memcmp(c->buf, "HTTP/1.", 7))
		return -1;
	*status = atoi(c->buf + 9);
	for (char *p = memchr(c->buf, '\n', (size_t)head); p && p < end; p = memchr(p, '\n', (size_t)(end - p))) {
		p++;
		if (!strncasecmp(p, "content-length:", 15))
			clen = strtol(p + 15, NULL, 10);
		else if (!strncasecmp(p, "transfer-encoding:", 18))
			return -1;
	}
	if (clen < 0 || head + clen > BUF_SIZE)
		return -1;
	return (size_t)(head + clen) <= c->len ? head + clen : 0;
}

static void usage(void)
{
	fprintf(stderr, "usage: loadgen [-w WARMUP] [-d DRAIN] [-H HOST] [-p PATH] ADDR PORT RATE SECONDS CONNECTIONS\n");
	exit(2);
}

int main(int argc, char **argv)
{
	double warmup = 1, drain = 2, rate, seconds;
	const char *host_header = NULL, *path = "/";
	uint64_t start, t_measure, t_end, t_stop, scheduled = 0, completed = 0, unfinished = 0;
	double interval;
	int opt;

	while ((opt = getopt(argc, argv, "w:d:H:p:")) != -1) {
		switch (opt) {
		case 'w': warmup = atof(optarg); break;
		case 'd': drain = atof(optarg); break;
		case 'H': host_header = optarg; break;
		case 'p': path = optarg; break;
		default: usage();
		}
	}
	if (argc - optind != 5)
		usage();
	addr.sin_family = AF_INET;
	addr.sin_port = htons((uint16_t)atoi(argv[optind + 1]));
	if (inet_pton(AF_INET, argv[optind], &addr.sin_addr) != 1) {
		fprintf(stderr, "loadgen: %s is not an IPv4 address\n", argv[optind]);
		return 2;
	}
	rate = atof(argv[optind + 2]);
	seconds = atof(argv[optind + 3]);
	nconns = atoi(argv[optind + 4]);
	if (rate <= 0 || seconds <= 0 || warmup < 0 || drain < 0 || nconns < 1 || nconns > MAX_CONNS)
		usage();
	request_len = (size_t)snprintf(request, sizeof(request), "GET %s HTTP/1.1\r\nHost: %s:%s\r\n\r\n", path,
				       host_header ? host_header : argv[optind], argv[optind + 1]);
	if (host_header && strchr(host_header, ':'))   /* the caller gave host:port */
		request_len = (size_t)snprintf(request, sizeof(request), "GET %s HTTP/1.1\r\nHost: %s\r\n\r\n",
					       path, host_header);
	if (request_len >= sizeof(request))
		usage();

	signal(SIGPIPE, SIG_IGN);
	prctl(PR_SET_TIMERSLACK, 1UL);   /* wake up on time, not up to 50 us late */
	epfd = epoll_create1(0);
	conns = calloc((size_t)nconns, sizeof(*conns));
	if (epfd < 0 || !conns) {
		perror("loadgen");
		return 1;
	}
	for (int k = 0; k < nconns; k++) {
		if (dial(&conns[k]) < 0) {
			fprintf(stderr, "loadgen: connect %s:%s: %s\n", argv[optind], argv[optind + 1], strerror(errno));
			return 1;
		}
	}

	interval = 1e9 / rate;
	start = now_ns() + 1000000;       /* 1 ms from now */
	t_measure = start + (uint64_t)(warmup * 1e9);
	t_end = t_measure + (uint64_t)(seconds * 1e9);
	t_stop = t_end + (uint64_t)(drain * 1e9);

	for (;;) {
		uint64_t now = now_ns(), wake = t_stop;
		int active = 0;

		if (now >= t_stop)
			break;
		for (int k = 0; k < nconns; k++) {
			struct conn *c = &conns[k];
			uint64_t t;

			if (c->busy) {
				active = 1;
				continue;
			}
			if (c->fd < 0)
				continue;
			t = start + (uint64_t)((double)(c->j * (uint64_t)nconns + (uint64_t)k) * interval);
			if (t >= t_end)
				continue;         /* this connection's schedule is done */
			active = 1;
			if (t > now) {
				if (t < wake)
					wake = t;
				continue;
			}
			if (t >= t_measure && c->idle_since <= t)
				record(&lag, now - t);   /* it was idle at t: any lateness is ours */
			c->busy = 1;
			c->sched = t;
			c->wpos = 0;
			c->j++;
			flush_write(c);
		}
		if (!active)
			break;

		struct epoll_event evs[256];
		struct timespec ts;
		uint64_t wait = wake > now ? wake - now : 0;

		ts.tv_sec = (time_t)(wait / 1000000000ull);
		ts.tv_nsec = (long)(wait % 1000000000ull);
		int n = epoll_pwait2(epfd, evs, 256, &ts, NULL);

		if (n < 0 && errno != EINTR) {
			perror("loadgen: epoll_pwait2");
			return 1;
		}
		for (int i = 0; i < n; i++) {
			struct conn *c = evs[i].data.ptr;

			if (c->fd < 0)
				continue;
			if ((evs[i].events & EPOLLOUT) && c->busy) {
				struct epoll_event ev = { .events = EPOLLIN, .data.ptr = c };

				epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
				flush_write(c);
				if (c->fd < 0)
					continue;
			}
			if (!(evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)))
				continue;
			ssize_t r = read(c->fd, c->buf + c->len, BUF_SIZE - c->len);

			if (r < 0 && (errno == EAGAIN || errno == EINTR))
				continue;
			if (r <= 0 || !c->busy) {     /* closed, error, or bytes nobody asked for */
				fail(c);
				continue;
			}
			c->len += (size_t)r;
			int status = 0;
			long total = response_length(c, &status);

			if (total < 0) {
				fail(c);
				continue;
			}
			if (total == 0)
				continue;
			uint64_t done = now_ns();

			total_completed++;

			if (c->sched >= t_measure) {
				record(&lat, done - c->sched);
				completed++;
				if (status < 200 || status > 299)
					non2xx++;
			}
			memmove(c->buf, c->buf + total, c->len - (size_t)total);
			c->len -= (size_t)total;
			c->busy = 0;
			c->idle_since = done;
		}
	}

	/* What was scheduled in the measured window and never completed: recorded with the wait so far. */
	uint64_t now = now_ns();

	for (int k = 0; k < nconns; k++) {
		struct conn *c = &conns[k];

		if (c->busy && c->sched >= t_measure) {
			record(&lat, now - c->sched);
			unfinished++;
		}
		for (uint64_t j = c->j;; j++) {
			uint64_t t = start + (uint64_t)((double)(j * (uint64_t)nconns + (uint64_t)k) * interval);

			if (t >= t_end)
				break;
			if (t >= t_measure) {
				record(&lat, now - t);
				unfinished++;
			}
		}
	}
	/* Scheduled in [t_measure, t_end): */
	for (int k = 0; k < nconns; k++) {
		for (uint64_t j = 0;; j++) {
			uint64_t t = start + (uint64_t)((double)(j * (uint64_t)nconns + (uint64_t)k) * interval);

			if (t >= t_end)
				break;
			if (t >= t_measure)
				scheduled++;
		}
	}
	printf("{\"rate\": %.1f, \"achieved_rate\": %.1f, \"connections\": %d, \"seconds\": %.3f, "
	       "\"scheduled\": %llu, \"completed\": %llu, \"unfinished\": %llu, \"errors\": %llu, "
	       "\"non_2xx\": %llu, \"reconnects\": %llu, \"p50_us\": %.1f, \"p90_us\": %.1f, \"p99_us\": %.1f, "
	       "\"p999_us\": %.1f, \"max_us\": %.1f, \"mean_us\": %.1f, \"send_lag_p99_us\": %.1f, "
	       "\"total_completed\": %llu}\n",
	       rate, completed / seconds, nconns, seconds, (unsigned long long)scheduled,
	       (unsigned long long)completed, (unsigned long long)unfinished, (unsigned long long)errors,
	       (unsigned long long)non2xx, (unsigned long long)reconnects, pct_us(&lat, 0.50), pct_us(&lat, 0.90),
	       pct_us(&lat, 0.99), pct_us(&lat, 0.999), lat.max / 1000.0,
	       lat.count ? (double)lat.sum / (double)lat.count / 1000.0 : 0.0, pct_us(&lag, 0.99),
	       (unsigned long long)total_completed);
	for (int k = 0; k < nconns; k++)
		if (conns[k].fd >= 0)
			close(conns[k].fd);
	return 0;
}
