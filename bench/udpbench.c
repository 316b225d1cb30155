/* udpbench: UDP packet-rate and request/response latency for ksbpf's benchmarks.
 *
 *   udpbench sink  PORT SECONDS              count datagrams; JSON on stdout
 *   udpbench blast HOST PORT SIZE SECONDS BATCH [PPS [DEV]]
 *                                            send SIZE-byte datagrams (sendmmsg, BATCH per call),
 *                                            at most PPS a second (0: as fast as it can), out of
 *                                            DEV (SO_BINDTODEVICE); "attempts" counts failed sends
 *                                            too (a kill switch's drop fails the send: EPERM)
 *   udpbench echo  PORT                      echo every datagram back until killed
 *   udpbench rr    HOST PORT SIZE SECONDS    one request in flight; RTT percentiles
 *
 * IPv4 only: the bench topology is IPv4. Compiled by bench/run.py at run time.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/resource.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define MAX_BATCH 256
#define MAX_SIZE 65507

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *what)
{
	fprintf(stderr, "udpbench: %s: %s\n", what, strerror(errno));
	exit(1);
}

static int udp_socket(void)
{
	int fd = socket(AF_INET, SOCK_DGRAM, 0);
	if (fd < 0)
		die("socket");
	return fd;
}

static struct sockaddr_in addr_of(const char *host, int port)
{
	struct sockaddr_in a;
	memset(&a, 0, sizeof(a));
	a.sin_family = AF_INET;
	a.sin_port = htons((uint16_t)port);
	if (host && inet_pton(AF_INET, host, &a.sin_addr) != 1) {
		fprintf(stderr, "udpbench: bad IPv4 address %s\n", host);
		exit(2);
	}
	if (!host)
		a.sin_addr.s_addr = htonl(INADDR_ANY);
	return a;
}

static int bound(int port, int rcvbuf)
{
	int fd = udp_socket();
	struct sockaddr_in a = addr_of(NULL, port);
	int one = 1;
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (rcvbuf)
		setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof(rcvbuf));
	if (bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0)
		die("bind");
	return fd;
}

static int connected(const char *host, int port)
{
	int fd = udp_socket();
	struct sockaddr_in a = addr_of(host, port);
	if (connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0)
		die("connect");
	return fd;
}

/* Counts from the first datagram until SECONDS have passed or the sender has been quiet
 * for 300 ms; the rate is taken over first..last datagram. */
static int cmd_sink(int port, double seconds)
{
	int fd = bound(port, 8 << 20);
	static char bufs[MAX_BATCH][2048];
	struct mmsghdr msgs[MAX_BATCH];
	struct iovec iov[MAX_BATCH];
	for (int i = 0; i < MAX_BATCH; i++) {
		iov[i].iov_base = bufs[i];
		iov[i].iov_len = sizeof(bufs[i]);
		memset(&msgs[i], 0, sizeof(msgs[i]));
		msgs[i].msg_hdr.msg_iov = &iov[i];
		msgs[i].msg_hdr.msg_iovlen = 1;
	}
	struct timeval tv = { .tv_sec = 0, .tv_usec = 300000 };
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	printf("{\"ready\": true}\n");
	fflush(stdout);
	uint64_t packets = 0, first = 0, last = 0, limit = (uint64_t)(seconds * 1e9);
	for (;;) {
		int n = recvmmsg(fd, msgs, MAX_BATCH, 0, NULL);
		uint64_t t = now_ns();
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK) {
				if (packets)
					break;
				if (t - (first ? first : t) > limit)
					break;
				continue;
			}
			die("recvmmsg");
		}
		if (!packets)
			first = t;
		packets += (uint64_t)n;
		last = t;
		if (last - first > limit)
			break;
	}
	double span = (double)(last - first) / 1e9;
	printf("{\"packets\": %llu, \"seconds\": %.6f, \"pps\": %.1f}\n", (unsigned long long)packets, span,
	       span > 0 ? (double)packets / span : 0.0);
	return 0;
}

static int cmd_blast(const char *host, int port, int size, double seconds, int batch, double pps,
		     const char *dev)
{
	if (size < 1 || size > MAX_SIZE || batch < 1 || batch > MAX_BATCH || pps < 0) {
		fprintf(stderr, "udpbench: size 1-%d, batch 1-%d, pps >= 0\n", MAX_SIZE, MAX_BATCH);
		return 2;
	}
	int fd = udp_socket();
	if (dev && *dev && setsockopt(fd, SOL_SOCKET, SO_BINDTODEVICE, dev, (socklen_t)strlen(dev)) < 0)
		die("SO_BINDTODEVICE");
	struct sockaddr_in dst = addr_of(host, port);
	if (connect(fd, (struct sockaddr *)&dst, sizeof(dst)) < 0)
		die("connect");
	char *buf = calloc(1, (size_t)size);
	struct mmsghdr msgs[MAX_BATCH];
	struct iovec iov = { .iov_base = buf, .iov_len = (size_t)size };
	for (int i = 0; i < batch; i++) {
		memset(&msgs[i], 0, sizeof(msgs[i]));
		msgs[i].msg_hdr.msg_iov = &iov;
		msgs[i].msg_hdr.msg_iovlen = 1;
	}
	uint64_t sent = 0, errors = 0, attempts = 0, start = now_ns(), end = start + (uint64_t)(seconds * 1e9),
		 t = start;
	int last_errno = 0;
	while (t < end) {
		for (int k = 0; k < 64; k++) {
			int n = batch == 1 ? (int)(send(fd, buf, (size_t)size, 0) == size) : sendmmsg(fd, msgs, (unsigned)batch, 0);
			if (n > 0) {
				sent += (uint64_t)n;
				attempts += (uint64_t)n;
			} else {
				errors++;
				attempts++;
				last_errno = errno;
			}
		}
		t = now_ns();
		if (pps > 0) {
			/* Paced: sleep until the schedule has caught up with what was attempted. */
			uint64_t due = start + (uint64_t)((double)attempts / pps * 1e9);
			if (due > end)
				due = end;
			if (due > t) {
				struct timespec ts = { .tv_sec = (time_t)((due - t) / 1000000000ull),
						       .tv_nsec = (long)((due - t) % 1000000000ull) };
				nanosleep(&ts, NULL);
				t = now_ns();
			}
		}
	}
	double span = (double)(t - start) / 1e9;
	/* The veth peer's receive path runs in this task's softirq on this CPU, so this CPU
	 * time is the whole path's cost, whatever else the machine's CPUs were doing. */
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	double cpu = (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
		     (double)ru.ru_stime.tv_usec / 1e6;
	printf("{\"packets\": %llu, \"errors\": %llu, \"attempts\": %llu, \"last_errno\": %d, \"seconds\": %.6f, "
	       "\"pps\": %.1f, \"attempts_pps\": %.1f, \"cpu_s\": %.6f, \"pps_per_cpu\": %.1f}\n",
	       (unsigned long long)sent, (unsigned long long)errors, (unsigned long long)attempts, last_errno, span,
	       (double)sent / span, (double)attempts / span, cpu, cpu > 0 ? (double)sent / cpu : 0.0);
	return 0;
}

static _Noreturn void cmd_echo(int port)
{
	int fd = bound(port, 0);
	char buf[MAX_SIZE];
	struct sockaddr_in peer;
	printf("{\"ready\": true}\n");
	fflush(stdout);
	for (;;) {
		socklen_t len = sizeof(peer);
		ssize_t n = recvfrom(fd, buf, sizeof(buf), 0, (struct sockaddr *)&peer, &len);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			die("recvfrom");
		}
		sendto(fd, buf, (size_t)n, 0, (struct sockaddr *)&peer, len);
	}
}

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
	return (x > y) - (x < y);
}

static double pct(const uint32_t *v, size_t n, double p)
{
	size_t i = (size_t)(p * (double)(n - 1) + 0.5);
	return (double)v[i] / 1000.0;
}

static int cmd_rr(const char *host, int port, int size, double seconds)
{
	int fd = connected(host, port);
	char *buf = calloc(1, (size_t)size), in[MAX_SIZE];
	struct timeval tv = { .tv_sec = 1, .tv_usec = 0 };
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	size_t cap = 1 << 20, n = 0;
	uint32_t *rtt = malloc(cap * sizeof(*rtt));
	uint64_t lost = 0, start = now_ns(), end = start + (uint64_t)(seconds * 1e9), t = start;
	while (t < end) {
		uint64_t t0 = now_ns();
		if (send(fd, buf, (size_t)size, 0) != size)
			die("send");
		ssize_t r = recv(fd, in, sizeof(in), 0);
		t = now_ns();
		if (r < 0) {
			lost++;
			continue;
		}
		if (n == cap) {
			cap *= 2;
			rtt = realloc(rtt, cap * sizeof(*rtt));
		}
		rtt[n++] = (uint32_t)(t - t0);
	}
	if (!n) {
		fprintf(stderr, "udpbench: no replies\n");
		return 1;
	}
	qsort(rtt, n, sizeof(*rtt), cmp_u32);
	double sum = 0;
	for (size_t i = 0; i < n; i++)
		sum += rtt[i];
	printf("{\"requests\": %zu, \"lost\": %llu, \"p50_us\": %.3f, \"p90_us\": %.3f, \"p99_us\": %.3f, "
	       "\"p999_us\": %.3f, \"mean_us\": %.3f}\n",
	       n, (unsigned long long)lost, pct(rtt, n, 0.50), pct(rtt, n, 0.90), pct(rtt, n, 0.99), pct(rtt, n, 0.999),
	       sum / (double)n / 1000.0);
	return 0;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc == 4 && !strcmp(argv[1], "sink"))
		return cmd_sink(atoi(argv[2]), atof(argv[3]));
	if (argc >= 7 && argc <= 9 && !strcmp(argv[1], "blast"))
		return cmd_blast(argv[2], atoi(argv[3]), atoi(argv[4]), atof(argv[5]), atoi(argv[6]),
				 argc >= 8 ? atof(argv[7]) : 0.0, argc == 9 ? argv[8] : NULL);
	if (argc == 3 && !strcmp(argv[1], "echo"))
		cmd_echo(atoi(argv[2]));
	if (argc == 6 && !strcmp(argv[1], "rr"))
		return cmd_rr(argv[2], atoi(argv[3]), atoi(argv[4]), atof(argv[5]));
	fprintf(stderr, "usage: udpbench sink PORT SECONDS | blast HOST PORT SIZE SECONDS BATCH [PPS [DEV]] | "
			"echo PORT | rr HOST PORT SIZE SECONDS\n");
	return 2;
}
