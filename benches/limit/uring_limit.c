/*
 * uring_limit: the "limit" of the HTTP benchmark, a raw io_uring responder in C.
 *
 * It answers every request head it sees with one fixed "Hello, World!" response. It does no
 * HTTP parsing: it only counts "\r\n\r\n" terminators, so that a pipelined batch of N requests
 * gets N responses. There is no Python and no per-request allocation, so its server CPU time per
 * request is roughly what the kernel's TCP work costs: the floor a Python server can approach.
 *
 * The I/O shape is the one uringserve's native loop aims for:
 *   - one multishot accept on the listener;
 *   - one multishot recv per connection, on a ring of provided buffers, each buffer scanned and
 *     handed back to the kernel within the same batch of completions;
 *   - at most one send in flight per connection (two sends on one socket may complete out of
 *     order), the responses owed meanwhile accumulate and go out in the next send;
 *   - one io_uring_enter per batch (submit what is queued and wait for completions together);
 *   - cancels and closes go through the ring too, so a connection costs no extra syscall.
 *
 * Usage: uring_limit PORT [--close]
 *   --close  answer with "Connection: close" and close the connection after each response
 *            (the Connection: close scenario; the responder still parses nothing).
 *
 * Listens on 127.0.0.1 only. Build: gcc -O2 -Wall -o uring_limit uring_limit.c -luring
 * (benches/http_bench.py and `make limit` do this). Written against liburing 2.3's man pages.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <liburing.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

enum op { OP_ACCEPT = 1, OP_RECV = 2, OP_SEND = 3, OP_OTHER = 4 };

#define RING_ENTRIES 4096
/* Large enough that 10,000 connections answering at once do not push the CQ into overflow. */
#define CQ_ENTRIES 32768
#define BUF_GROUP 1
#define N_BUFS 1024 /* a power of two: the buffer ring's index is masked */
#define BUF_SIZE 4096
/* One send carries up to this many responses: a pipelined batch of 16 fits in one. */
#define RESPONSES_PER_SEND 64

/* conn.flags */
#define RECV_ARMED 0x1u
#define SEND_IN_FLIGHT 0x2u
#define CLOSING 0x4u
#define CANCELLED 0x8u

struct conn {
	uint64_t owed;  /* response bytes not yet sent (the send in flight's included) */
	uint16_t phase; /* offset in the response where the next byte to send starts */
	uint8_t match;  /* how much of "\r\n\r\n" the bytes so far end with */
	uint8_t flags;
};

static struct io_uring ring;
static struct io_uring_buf_ring *buf_ring;
static unsigned char *buffers;
static unsigned recycled; /* buffers handed back since the last advance */
static struct conn *conns;
static unsigned max_conns;
static int listen_fd;
static int close_mode;

static const char *response;
static size_t response_len;
/* RESPONSES_PER_SEND + 1 copies back to back, so a send may start at any phase of one. */
static char *responses;

static void die(const char *what, int err)
{
	fprintf(stderr, "uring_limit: %s: %s\n", what, strerror(err));
	exit(1);
}

static uint64_t user_data(enum op op, int fd)
{
	return ((uint64_t)op << 32) | (uint32_t)fd;
}

static struct io_uring_sqe *get_sqe(void)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
	if (!sqe) {
		/* The SQ is full: hand what is queued to the kernel; the next wait collects its CQEs. */
		int ret = io_uring_submit(&ring);
		if (ret < 0)
			die("io_uring_submit", -ret);
		sqe = io_uring_get_sqe(&ring);
		if (!sqe)
			die("io_uring_get_sqe", EBUSY);
	}
	return sqe;
}

static void arm_accept(void)
{
	struct io_uring_sqe *sqe = get_sqe();
	io_uring_prep_multishot_accept(sqe, listen_fd, NULL, NULL, 0);
	io_uring_sqe_set_data64(sqe, user_data(OP_ACCEPT, listen_fd));
}

static void arm_recv(int fd)
{
	struct io_uring_sqe *sqe = get_sqe();
	io_uring_prep_recv_multishot(sqe, fd, NULL, 0, 0);
	sqe->flags |= IOSQE_BUFFER_SELECT;
	sqe->buf_group = BUF_GROUP;
	io_uring_sqe_set_data64(sqe, user_data(OP_RECV, fd));
	conns[fd].flags |= RECV_ARMED;
}

static void send_owed(int fd)
{
	struct conn *c = &conns[fd];
	uint64_t room = (uint64_t)RESPONSES_PER_SEND * response_len;
	uint32_t len = (uint32_t)(c->owed < room ? c->owed : room);
	struct io_uring_sqe *sqe = get_sqe();

	io_uring_prep_send(sqe, fd, responses + c->phase, len, MSG_NOSIGNAL);
	io_uring_sqe_set_data64(sqe, user_data(OP_SEND, fd));
	c->flags |= SEND_IN_FLIGHT;
}

/*
 * Ends the armed recv so that the connection can be closed: its final CQE (-ECANCELED) comes in
 * a later batch. A cancel runs inline, where a shutdown op would be punted to an io-wq thread.
 */
static void cancel_recv(int fd)
{
	struct io_uring_sqe *sqe;

	if (conns[fd].flags & CANCELLED)
		return;
	conns[fd].flags |= CANCELLED;
	sqe = get_sqe();
	io_uring_prep_cancel64(sqe, user_data(OP_RECV, fd), 0);
	sqe->flags |= IOSQE_CQE_SKIP_SUCCESS;
	io_uring_sqe_set_data64(sqe, user_data(OP_OTHER, fd));
}

/*
 * Closes once no operation holds the file: close() does not cancel armed operations, and the fd
 * number must not be reused while a completion for it may still come.
 */
static void close_if_idle(int fd)
{
	struct io_uring_sqe *sqe;

	if (conns[fd].flags & (RECV_ARMED | SEND_IN_FLIGHT))
		return;
	sqe = get_sqe();
	io_uring_prep_close(sqe, fd);
	sqe->flags |= IOSQE_CQE_SKIP_SUCCESS;
	io_uring_sqe_set_data64(sqe, user_data(OP_OTHER, fd));
	conns[fd].flags = 0;
}

static unsigned count_heads(struct conn *c, const unsigned char *p, size_t n)
{
	static const char term[4] = {'\r', '\n', '\r', '\n'};
	unsigned m = c->match, heads = 0;

	for (size_t i = 0; i < n; i++) {
		if (p[i] == term[m]) {
			if (++m == 4) {
				heads++;
				m = 0;
			}
		} else {
			/* The only proper prefix of the terminator that is also a suffix is "\r". */
			m = p[i] == '\r';
		}
	}
	c->match = (uint8_t)m;
	return heads;
}

static void recycle(unsigned bid)
{
	io_uring_buf_ring_add(buf_ring, buffers + (size_t)bid * BUF_SIZE, BUF_SIZE, (unsigned short)bid,
			      io_uring_buf_ring_mask(N_BUFS), (int)recycled);
	recycled++;
}

static void on_accept(struct io_uring_cqe *cqe)
{
	int fd = cqe->res;

	if (!(cqe->flags & IORING_CQE_F_MORE))
		arm_accept(); /* multishot accept ends on any error (EMFILE...): keep accepting */
	if (fd < 0)
		return;
	if ((unsigned)fd >= max_conns) {
		close(fd);
		return;
	}
	memset(&conns[fd], 0, sizeof(conns[fd]));
	arm_recv(fd);
}

static void on_recv(struct io_uring_cqe *cqe, int fd)
{
	struct conn *c = &conns[fd];
	int res = cqe->res;

	if (res > 0) {
		unsigned bid = cqe->flags >> IORING_CQE_BUFFER_SHIFT;
		unsigned heads = count_heads(c, buffers + (size_t)bid * BUF_SIZE, (size_t)res);

		recycle(bid);
		if (heads && !(c->flags & CLOSING)) {
			c->owed += (uint64_t)heads * response_len;
			if (!(c->flags & SEND_IN_FLIGHT))
				send_owed(fd);
		}
	}
	if (cqe->flags & IORING_CQE_F_MORE)
		return;
	c->flags &= (uint8_t)~RECV_ARMED;
	/* ENOBUFS: the pool ran dry; the data waits in the socket, and buffers come back this batch. */
	if ((res > 0 || res == -ENOBUFS) && !(c->flags & (CLOSING | CANCELLED))) {
		arm_recv(fd);
		return;
	}
	c->flags |= CLOSING;
	close_if_idle(fd);
}

static void on_send(struct io_uring_cqe *cqe, int fd)
{
	struct conn *c = &conns[fd];
	int res = cqe->res;

	c->flags &= (uint8_t)~SEND_IN_FLIGHT;
	if (res < 0) {
		c->flags |= CLOSING;
		if (c->flags & RECV_ARMED)
			cancel_recv(fd);
		close_if_idle(fd);
		return;
	}
	/* A short write is normal: the rest stays owed and goes out in the next send. */
	c->owed -= (uint64_t)res;
	c->phase = (uint16_t)((c->phase + (uint64_t)res) % response_len);
	if (c->owed && !(c->flags & CLOSING)) {
		send_owed(fd);
	} else if (close_mode || (c->flags & CLOSING)) {
		if (c->flags & RECV_ARMED)
			cancel_recv(fd);
		else
			close_if_idle(fd);
	}
}

static void setup_listener(int port)
{
	struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
	int one = 1;

	listen_fd = socket(AF_INET, SOCK_STREAM, 0);
	if (listen_fd < 0)
		die("socket", errno);
	addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (setsockopt(listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0)
		die("SO_REUSEADDR", errno);
	/* Accepted sockets inherit TCP_NODELAY on Linux: no setsockopt per connection. */
	if (setsockopt(listen_fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) < 0)
		die("TCP_NODELAY", errno);
	if (bind(listen_fd, (struct sockaddr *)&addr, sizeof(addr)) < 0)
		die("bind", errno);
	/* uringserve's, bjoern's and granian's default backlog: the same queue for every server. */
	if (listen(listen_fd, 1024) < 0)
		die("listen", errno);
}

static void setup_ring(void)
{
	struct io_uring_params p;
	/* Newest flags first; an older kernel says EINVAL and gets the next set. */
	static const unsigned flag_sets[] = {
		IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN,
		IORING_SETUP_COOP_TASKRUN,
		0,
	};
	int ret = -EINVAL;

	for (size_t i = 0; i < sizeof(flag_sets) / sizeof(flag_sets[0]) && ret == -EINVAL; i++) {
		memset(&p, 0, sizeof(p));
		p.flags = flag_sets[i] | IORING_SETUP_CQSIZE | IORING_SETUP_SUBMIT_ALL;
		p.cq_entries = CQ_ENTRIES;
		ret = io_uring_queue_init_params(RING_ENTRIES, &ring, &p);
	}
	if (ret < 0)
		die("io_uring_queue_init_params", -ret);
}

static void setup_buffers(void)
{
	size_t ring_bytes = N_BUFS * sizeof(struct io_uring_buf);
	struct io_uring_buf_reg reg = {0};
	int ret;

	buf_ring = mmap(NULL, ring_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1,
			0);
	if (buf_ring == MAP_FAILED)
		die("mmap buffer ring", errno);
	buffers = aligned_alloc(4096, (size_t)N_BUFS * BUF_SIZE);
	if (!buffers)
		die("buffers", ENOMEM);
	reg.ring_addr = (uint64_t)(uintptr_t)buf_ring;
	reg.ring_entries = N_BUFS;
	reg.bgid = BUF_GROUP;
	ret = io_uring_register_buf_ring(&ring, &reg, 0);
	if (ret < 0)
		die("io_uring_register_buf_ring", -ret);
	io_uring_buf_ring_init(buf_ring);
	for (unsigned bid = 0; bid < N_BUFS; bid++)
		recycle(bid);
	io_uring_buf_ring_advance(buf_ring, (int)recycled);
	recycled = 0;
}

static void setup_responses(void)
{
	static const char keep_alive[] = "HTTP/1.1 200 OK\r\n"
					 "Content-Type: text/plain\r\n"
					 "Content-Length: 13\r\n"
					 "\r\n"
					 "Hello, World!";
	static const char closing[] = "HTTP/1.1 200 OK\r\n"
				      "Content-Type: text/plain\r\n"
				      "Content-Length: 13\r\n"
				      "Connection: close\r\n"
				      "\r\n"
				      "Hello, World!";

	response = close_mode ? closing : keep_alive;
	response_len = strlen(response);
	responses = malloc(response_len * (RESPONSES_PER_SEND + 1));
	if (!responses)
		die("responses", ENOMEM);
	for (unsigned i = 0; i <= RESPONSES_PER_SEND; i++)
		memcpy(responses + i * response_len, response, response_len);
}

static void setup_conns(void)
{
	struct rlimit lim;

	/* The 10,000-idle-connections scenario needs more than the usual 1024 fds. */
	if (getrlimit(RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur < lim.rlim_max) {
		lim.rlim_cur = lim.rlim_max;
		setrlimit(RLIMIT_NOFILE, &lim);
	}
	if (getrlimit(RLIMIT_NOFILE, &lim) < 0)
		die("getrlimit", errno);
	max_conns = lim.rlim_cur > (1u << 20) ? (1u << 20) : (unsigned)lim.rlim_cur;
	conns = calloc(max_conns, sizeof(*conns));
	if (!conns)
		die("conns", ENOMEM);
}

int main(int argc, char **argv)
{
	if (argc < 2 || argc > 3 || (argc == 3 && strcmp(argv[2], "--close") != 0)) {
		fprintf(stderr, "usage: %s PORT [--close]\n", argv[0]);
		return 2;
	}
	close_mode = argc == 3;
	setup_responses();
	setup_conns();
	setup_listener(atoi(argv[1]));
	setup_ring();
	setup_buffers();
	arm_accept();

	for (;;) {
		struct io_uring_cqe *cqe;
		unsigned head, seen = 0;
		int ret = io_uring_submit_and_wait(&ring, 1);

		if (ret < 0 && ret != -EINTR && ret != -EAGAIN && ret != -EBUSY)
			die("io_uring_submit_and_wait", -ret);
		io_uring_for_each_cqe(&ring, head, cqe)
		{
			uint64_t data = io_uring_cqe_get_data64(cqe);
			int fd = (int)(uint32_t)data;

			switch ((enum op)(data >> 32)) {
			case OP_ACCEPT:
				on_accept(cqe);
				break;
			case OP_RECV:
				on_recv(cqe, fd);
				break;
			case OP_SEND:
				on_send(cqe, fd);
				break;
			default:
				break; /* a failed cancel or close: the connection is on its way out anyway */
			}
			seen++;
		}
		io_uring_cq_advance(&ring, seen);
		if (recycled) {
			io_uring_buf_ring_advance(buf_ring, (int)recycled);
			recycled = 0;
		}
	}
}
