/* echo_check: an ordinary WebSocket echo client, independent of sluice's
 * code, to check what sluice-load reports. One thread, one epoll loop,
 * every message written with its own send(2), as a population of
 * independent clients writes.
 *
 *   echo_check HOST PORT PATH echo CONNS DEPTH SIZE SECONDS [SERVER_PID]
 *       closed loop: each connection keeps DEPTH messages in flight and
 *       sends one more for each echo it reads, each with its own send(2)
 *   echo_check HOST PORT PATH burst CONNS DEPTH SIZE SECONDS [SERVER_PID]
 *       the same, but the messages that answer one read go out together,
 *       in one send(2) (the shape of a pipelining client)
 *   echo_check HOST PORT PATH rate CONNS RATE SIZE SECONDS [SERVER_PID]
 *       open loop: RATE messages a second over CONNS connections, in
 *       turn, on a fixed schedule; the loop busy-polls (epoll_wait with a
 *       zero timeout); each message carries its send time, and its echo's
 *       latency is taken against the schedule (no coordinated omission)
 *
 * HOST given as tls:HOST speaks wss:// (OpenSSL, the server's certificate
 * not checked): each write is one SSL_write, so one frame per write is
 * one record per frame, as a browser sends them.
 *
 * ECHO_CHECK_JSON=1: payloads are JSON-like text (records of ids, prices,
 * quantities and sides) in text frames, sent in turn from enough variants
 * that none repeats within 32 KiB, instead of 'x' repeated in binary
 * ones. ECHO_CHECK_DEFLATE=1 (echo and burst modes): offers
 * permessage-deflate without context takeover (RFC 7692; =2: leaving
 * context takeover to the server, as browsers do), fails unless
 * the server agrees, and sends every message compressed by zlib (level
 * 6, each variant compressed once, on its own); replies are counted
 * whether compressed or not.
 *
 * One second of warm-up, then SECONDS measured. Prints one JSON object:
 * messages per second, latency percentiles (rate mode) and, with
 * SERVER_PID, the server's CPU seconds per second of the window.
 * Build: cc -O2 -o echo_check bench/echo_check.c -lssl -lcrypto -lz */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

#define READ_CAP (256 * 1024)

struct conn {
    int fd;
    SSL *ssl; /* NULL over ws:// */
    size_t have;
    unsigned char *buf;
    size_t turn; /* the payload variant it sends next */
};

static SSL_CTX *tls_ctx; /* set for tls:HOST */
static int json_payload, deflate_payload; /* ECHO_CHECK_JSON, ECHO_CHECK_DEFLATE */
static void die(const char *what);

/* The payload of every message: `size` bytes of JSON-like text, or 'x'. */
static void fill_payload(unsigned char *p, size_t size, uint64_t variant) {
    if (!json_payload) {
        memset(p, 'x', size);
        return;
    }
    char rec[128];
    size_t at = 0;
    uint64_t x = 0x2545F4914F6CDD1Dull ^ (variant * 0x9E3779B97F4A7C15ull);
    at += (size_t)snprintf((char *)p, size + 1 > 11 ? 11 : size + 1, "{\"items\":[");
    while (at < size) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        int n = snprintf(rec, sizeof rec, "{\"id\":%llu,\"price\":%llu.%02llu,\"qty\":%llu,\"side\":\"%s\"},",
                         (unsigned long long)((x >> 8) % 1000000), (unsigned long long)((x >> 28) % 1000),
                         (unsigned long long)((x >> 40) % 100), (unsigned long long)((x >> 48) % 500),
                         (x & 1) ? "sell" : "buy");
        size_t take = (size_t)n < size - at ? (size_t)n : size - at;
        memcpy(p + at, rec, take);
        at += take;
    }
}

/* `in` compressed as one permessage-deflate message (raw deflate, sync
 * flush, the final 00 00 ff ff taken off: RFC 7692 7.2.1); its length. */
static size_t deflate_message(const unsigned char *in, size_t n, unsigned char *out, size_t cap) {
    z_stream z;
    memset(&z, 0, sizeof z);
    if (deflateInit2(&z, 6, Z_DEFLATED, -15, 8, Z_DEFAULT_STRATEGY) != Z_OK) die("deflateInit2");
    z.next_in = (unsigned char *)in;
    z.avail_in = (uInt)n;
    z.next_out = out;
    z.avail_out = (uInt)cap;
    if (deflate(&z, Z_SYNC_FLUSH) != Z_OK || z.avail_in != 0 || z.avail_out == 0) die("deflate");
    size_t len = cap - z.avail_out;
    deflateEnd(&z);
    return len - 4;
}

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

/* The server's user+system CPU seconds, from /proc/PID/stat. */
static double cpu_seconds(int pid) {
    char path[64], line[4096];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    size_t n = fread(line, 1, sizeof line - 1, f);
    fclose(f);
    line[n] = 0;
    char *p = strrchr(line, ')');
    if (!p) return 0;
    unsigned long utime = 0, stime = 0;
    /* fields after ')': state(3) ... utime(14) stime(15) */
    int field = 2;
    for (char *t = strtok(p + 1, " "); t; t = strtok(NULL, " ")) {
        field++;
        if (field == 14) utime = strtoul(t, NULL, 10);
        if (field == 15) { stime = strtoul(t, NULL, 10); break; }
    }
    return (double)(utime + stime) / (double)sysconf(_SC_CLK_TCK);
}

static void write_all(struct conn *c, const unsigned char *p, size_t n) {
    while (n > 0) {
        ssize_t w;
        if (c->ssl) {
            int r = SSL_write(c->ssl, p, (int)n);
            if (r <= 0) {
                int e = SSL_get_error(c->ssl, r);
                if (e == SSL_ERROR_WANT_WRITE || e == SSL_ERROR_WANT_READ) continue;
                ERR_print_errors_fp(stderr);
                die("SSL_write");
            }
            w = r;
        } else {
            w = send(c->fd, p, n, MSG_NOSIGNAL);
            if (w < 0) {
                if (errno == EAGAIN || errno == EINTR) continue;
                die("send");
            }
        }
        p += w;
        n -= (size_t)w;
    }
}

/* Reads what the connection has (MSG_DONTWAIT, or every decrypted byte
 * OpenSSL can give without blocking): > 0 bytes read, 0 the server
 * closed, -1 nothing yet. */
static ssize_t read_some(struct conn *c, unsigned char *p, size_t cap) {
    if (!c->ssl) {
        ssize_t r = recv(c->fd, p, cap, MSG_DONTWAIT);
        if (r < 0 && errno != EAGAIN) die("recv");
        return r;
    }
    size_t got = 0;
    while (got < cap) {
        int r = SSL_read(c->ssl, p + got, (int)(cap - got));
        if (r > 0) {
            got += (size_t)r;
            continue;
        }
        int e = SSL_get_error(c->ssl, r);
        if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) break;
        if (e == SSL_ERROR_ZERO_RETURN) return got > 0 ? (ssize_t)got : 0;
        ERR_print_errors_fp(stderr);
        die("SSL_read");
    }
    return got > 0 ? (ssize_t)got : -1;
}

/* JSON payloads are sent in turn from this many variants (records of the
 * same shape, other values): enough that a message's twin is never in
 * deflate's 32 KiB window, so a server that keeps its window between
 * messages (context takeover) finds only what real traffic gives it. */
#define MAX_VARIANTS 64
static size_t variants(size_t size) {
    size_t n = 40 * 1024 / (size ? size : 1) + 1;
    return json_payload ? (n < MAX_VARIANTS ? n : MAX_VARIANTS) : 1;
}

/* Appends one masked frame of `size` bytes whose first 8 bytes are
 * `stamp` to `frame`, of `c`'s next variant (each connection sends them in
 * turn, so a variant comes back only after all the others); returns its
 * length. The mask is
 * fixed, so each variant is masked once and copied after, with only the
 * stamp masked anew. */
static size_t encode_frame(struct conn *c, unsigned char *frame, size_t size, uint64_t stamp) {
    static const unsigned char mask[4] = {0x37, 0xfa, 0x21, 0x3d};
    static unsigned char template[MAX_VARIANTS][16 + 65536];
    static size_t template_size = (size_t)-1, template_len[MAX_VARIANTS];
    if (template_size != size) {
        static unsigned char plain[65536], packed[65536 + 1024];
        for (size_t v = 0; v < variants(size); v++) {
            fill_payload(plain, size, v);
            const unsigned char *payload = plain;
            size_t len = size;
            if (deflate_payload) {
                len = deflate_message(plain, size, packed, sizeof packed);
                payload = packed;
            }
            unsigned char *t = template[v];
            size_t h = 0;
            t[h++] = (json_payload ? 0x81 : 0x82) | (deflate_payload ? 0x40 : 0);
            if (len < 126) {
                t[h++] = 0x80 | (unsigned char)len;
            } else {
                t[h++] = 0x80 | 126;
                t[h++] = (unsigned char)(len >> 8);
                t[h++] = (unsigned char)len;
            }
            memcpy(t + h, mask, 4);
            h += 4;
            for (size_t i = 0; i < len; i++) t[h + i] = payload[i] ^ mask[i & 3];
            template_len[v] = h + len;
        }
        template_size = size;
    }
    size_t v = c->turn++ % variants(size);
    memcpy(frame, template[v], template_len[v]);
    if (size >= 8 && !deflate_payload) { /* a compressed payload has no stamp */
        unsigned char *payload = frame + template_len[v] - size;
        for (size_t i = 0; i < 8; i++) payload[i] = ((unsigned char *)&stamp)[i] ^ mask[i & 3];
    }
    return template_len[v];
}

/* One frame, written with one send(2) (one SSL_write). */
static void send_frame(struct conn *c, size_t size, uint64_t stamp) {
    static unsigned char frame[16 + 65536];
    write_all(c, frame, encode_frame(c, frame, size, stamp));
}

static void open_conn(struct conn *c, const char *host, int port, const char *path) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) die("socket");
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, host, &a.sin_addr);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) die("connect");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->fd = fd;
    c->ssl = NULL;
    if (tls_ctx) {
        c->ssl = SSL_new(tls_ctx);
        SSL_set_fd(c->ssl, fd);
        SSL_set_tlsext_host_name(c->ssl, "localhost");
        if (SSL_connect(c->ssl) != 1) {
            ERR_print_errors_fp(stderr);
            die("SSL_connect");
        }
    }
    char req[512];
    int n = snprintf(req, sizeof req,
                     "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n%s\r\n",
                     path, host, port,
                     deflate_payload == 2 ? "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
                     : deflate_payload   ? "Sec-WebSocket-Extensions: permessage-deflate; "
                                           "server_no_context_takeover; client_no_context_takeover\r\n"
                                         : "");
    write_all(c, (unsigned char *)req, (size_t)n);
    /* read the 101 head byte by byte, so no frame is taken with it */
    char head[4096];
    size_t got = 0;
    while (got < sizeof head - 1) {
        ssize_t r = c->ssl ? SSL_read(c->ssl, head + got, 1) : recv(fd, head + got, 1, 0);
        if (r <= 0) die("handshake");
        got++;
        if (got >= 4 && memcmp(head + got - 4, "\r\n\r\n", 4) == 0) break;
    }
    head[got] = 0;
    if (strncmp(head, "HTTP/1.1 101", 12) != 0) {
        fprintf(stderr, "handshake refused: %s\n", head);
        exit(1);
    }
    if (deflate_payload && !strstr(head, "permessage-deflate")) {
        fprintf(stderr, "permessage-deflate declined: %s\n", head);
        exit(1);
    }
    /* From here reads never block (OpenSSL then answers WANT_READ). */
    if (c->ssl) fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    if (argc < 9) {
        fprintf(stderr, "usage: %s HOST PORT PATH echo|rate CONNS DEPTH|RATE SIZE SECONDS [SERVER_PID]\n", argv[0]);
        return 2;
    }
    const char *host = argv[1], *path = argv[3];
    if (strncmp(host, "tls:", 4) == 0) {
        host += 4;
        tls_ctx = SSL_CTX_new(TLS_client_method());
        SSL_CTX_set_verify(tls_ctx, SSL_VERIFY_NONE, NULL);
    }
    int port = atoi(argv[2]);
    int rate_mode = strcmp(argv[4], "rate") == 0;
    int burst_mode = strcmp(argv[4], "burst") == 0;
    int conns = atoi(argv[5]);
    double knob = atof(argv[6]);
    size_t size = (size_t)atol(argv[7]);
    double seconds = atof(argv[8]);
    int server_pid = argc > 9 ? atoi(argv[9]) : 0;
    json_payload = getenv("ECHO_CHECK_JSON") && atoi(getenv("ECHO_CHECK_JSON"));
    deflate_payload = getenv("ECHO_CHECK_DEFLATE") ? atoi(getenv("ECHO_CHECK_DEFLATE")) : 0;
    if (deflate_payload && rate_mode) {
        fprintf(stderr, "ECHO_CHECK_DEFLATE is for echo and burst modes\n");
        return 2;
    }
    if (!rate_mode && !burst_mode && strcmp(argv[4], "echo") != 0) {
        fprintf(stderr, "mode must be echo, burst or rate\n");
        return 2;
    }
    /* Writes block: what one connection has in flight must fit the two
     * sockets' buffers, or client and server could both wait to write. */
    if (!rate_mode && knob * (double)(size + 14) > 128 * 1024) {
        fprintf(stderr, "DEPTH x SIZE must stay within 128 KiB\n");
        return 2;
    }
    if (size > 65535 || (rate_mode && size < 8)) {
        fprintf(stderr, "SIZE must be 8..65535 in rate mode, at most 65535 in echo mode\n");
        return 2;
    }

    int ep = epoll_create1(0);
    struct conn *cs = calloc((size_t)conns, sizeof *cs);
    for (int i = 0; i < conns; i++) {
        open_conn(&cs[i], host, port, path);
        cs[i].buf = malloc(READ_CAP);
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, cs[i].fd, &ev) < 0) die("epoll_ctl");
    }

    uint64_t start = now_ns();
    uint64_t warm_end = start + 1000000000ull;
    uint64_t end = warm_end + (uint64_t)(seconds * 1e9);
    uint64_t interval = rate_mode ? (uint64_t)(1e9 / knob) : 0;
    uint64_t next_send = start;
    size_t lat_cap = rate_mode ? (size_t)(knob * seconds * 1.1) + 16 : 0;
    uint64_t *lat = rate_mode ? malloc(lat_cap * sizeof *lat) : NULL;
    size_t lat_n = 0;
    uint64_t received = 0;
    int turn = 0;
    double cpu_start = 0;
    int warm = 1;

    if (!rate_mode)
        for (int i = 0; i < conns; i++)
            for (int d = 0; d < (int)knob; d++) send_frame(&cs[i], size, 0);

    struct epoll_event evs[256];
    for (;;) {
        uint64_t now = now_ns();
        if (warm && now >= warm_end) {
            warm = 0;
            received = 0;
            lat_n = 0;
            if (server_pid) cpu_start = cpu_seconds(server_pid);
        }
        if (now >= end) break;
        if (rate_mode) {
            while (next_send <= now) {
                send_frame(&cs[turn], size, next_send);
                turn = (turn + 1) % conns;
                next_send += interval;
            }
        }
        int n = epoll_wait(ep, evs, 256, rate_mode ? 0 : 100);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int e = 0; e < n; e++) {
            struct conn *c = &cs[evs[e].data.u32];
        again:;
            ssize_t r = read_some(c, c->buf + c->have, READ_CAP - c->have);
            if (r == 0) {
                fprintf(stderr, "server closed a connection\n");
                return 1;
            }
            if (r < 0) continue;
            c->have += (size_t)r;
            size_t off = 0, answers = 0;
            uint64_t t = rate_mode ? now_ns() : 0;
            for (;;) {
                if (c->have - off < 2) break;
                unsigned char *f = c->buf + off;
                size_t len = f[1] & 0x7f, h = 2;
                if (len == 126) {
                    if (c->have - off < 4) break;
                    len = ((size_t)f[2] << 8) | f[3];
                    h = 4;
                } else if (len == 127) {
                    fprintf(stderr, "unexpected 64-bit length\n");
                    return 1;
                }
                if (c->have - off < h + len) break;
                received++;
                if (rate_mode) {
                    uint64_t stamp;
                    memcpy(&stamp, f + h, 8);
                    if (lat_n < lat_cap && t > stamp) lat[lat_n++] = t - stamp;
                } else if (burst_mode) {
                    answers++;
                } else {
                    send_frame(c, size, 0);
                }
                off += h + len;
            }
            if (answers > 0) {
                static unsigned char out[READ_CAP];
                size_t len = 0;
                while (answers > 0 && len + 16 + size <= sizeof out) {
                    len += encode_frame(c, out + len, size, 0);
                    answers--;
                }
                write_all(c, out, len);
                for (; answers > 0; answers--) send_frame(c, size, 0);
            }
            memmove(c->buf, c->buf + off, c->have - off);
            c->have -= off;
            /* OpenSSL may hold decrypted bytes the socket no longer
             * signals: take them before waiting again. */
            if (c->ssl && SSL_pending(c->ssl) > 0) goto again;
        }
    }
    double cpu = server_pid ? cpu_seconds(server_pid) - cpu_start : 0;
    printf("{\"messages_per_second\": %.0f, \"server_cpu\": %.3f", (double)received / seconds, cpu / seconds);
    if (rate_mode && lat_n > 0) {
        qsort(lat, lat_n, sizeof *lat, cmp_u64);
        printf(", \"p50_us\": %.1f, \"p99_us\": %.1f, \"p999_us\": %.1f, \"max_us\": %.1f",
               lat[lat_n / 2] / 1e3, lat[lat_n * 99 / 100] / 1e3, lat[lat_n * 999 / 1000] / 1e3,
               lat[lat_n - 1] / 1e3);
    }
    printf("}\n");
    return 0;
}
