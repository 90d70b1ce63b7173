/*
 * A C Ouroboros 0.23 peer for tests/net/test_interop.py: what oping cannot show, how a flow ends.
 *
 *   o7s_peer client NAME TIMEOUT_MS IDLE_MS
 *       allocates a raw flow to NAME with a peer timeout of TIMEOUT_MS, pings, sends nothing for
 *       IDLE_MS (the keepalives must carry the flow), pings again and deallocates.
 *   o7s_peer server
 *       accepts one flow, echoes what arrives, and says how the flow ended ("ended -1006" when
 *       the peer went silent: FLOWPEER) and how long after the last packet it noticed.
 *   o7s_peer sink BYTES DELAY_US HOLD_MS
 *       accepts one flow, reads BYTES bytes (sleeping DELAY_US before each read: a slow reader)
 *       and checks each against the pattern below; then reads on for HOLD_MS (anything more is
 *       a duplicate) and deallocates.
 *   o7s_peer source NAME BYTES SDU
 *       allocates a qos_data flow to NAME, writes BYTES bytes of the pattern in SDUs of SDU
 *       bytes and deallocates at once (0.23 lingers until its data is acknowledged).
 *
 * The pattern: byte i of the stream is byte i % 4 of the big-endian 32-bit number i / 4, so a
 * lost, repeated or misplaced SDU shows at its first byte.
 */

#include <ouroboros/dev.h>
#include <ouroboros/errno.h>
#include <ouroboros/fccntl.h>
#include <ouroboros/qos.h>

#include <errno.h>
#include <stdint.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static long now_ms(void)
{
        struct timespec t;
        clock_gettime(CLOCK_MONOTONIC, &t);
        return t.tv_sec * 1000L + t.tv_nsec / 1000000L;
}

/* Reads with a short timeout: 0.23 counts a peer alive only by what the application pulls
 * (keepalives included), so a reader that stopped reading would call the peer gone itself. */
static ssize_t read_some(int fd, char * buf, size_t len, long ms)
{
        struct timespec tick = {0, 100 * 1000000L};
        long            end  = now_ms() + ms;
        ssize_t         n;

        fccntl(fd, FLOWSRCVTIMEO, &tick);
        do {
                n = flow_read(fd, buf, len);
                if (n != -ETIMEDOUT)
                        return n;
        } while (ms < 0 || now_ms() < end);
        return -ETIMEDOUT;
}

static int ping(int fd, const char * what)
{
        char    buf[64];
        ssize_t n;

        if (flow_write(fd, what, strlen(what)) < 0)
                return -1;
        n = read_some(fd, buf, sizeof(buf), 5000);
        if (n < 0) {
                printf("read failed %zd\n", n);
                return -1;
        }
        printf("echo %.*s\n", (int) n, buf);
        fflush(stdout);
        return 0;
}

static int client(const char * name, int timeout_ms, int idle_ms)
{
        qosspec_t qs = qos_raw;
        char      buf[64];
        ssize_t   n;
        int       fd;
        int       tries;

        qs.timeout = timeout_ms;
        /* A few tries: under load, a C udp4 IPCP may take the reply before it has noted where
           the request went ("Flow allocation reply ... from wrong source"), and the alloc fails. */
        for (tries = 0; (fd = flow_alloc(name, &qs, NULL)) < 0; ++tries) {
                printf("alloc failed %d\n", fd);
                fflush(stdout);
                if (tries == 2)
                        return 1;
        }
        if (ping(fd, "ping-1") < 0)
                return 1;
        n = read_some(fd, buf, sizeof(buf), idle_ms);  /* nothing but keepalives */
        if (n != -ETIMEDOUT) {
                printf("idle read %zd\n", n);
                return 1;
        }
        if (ping(fd, "ping-2") < 0)
                return 1;
        flow_dealloc(fd);
        printf("deallocated\n");
        return 0;
}

static int server(void)
{
        qosspec_t qs;
        char      buf[2048];
        long      last;
        ssize_t   n;
        int       fd;
        int       tries;

        /* A few tries: under load, a C udp4 IPCP may answer a request before it has noted
           where the request came from (its reply then fails, and so does this accept). */
        for (tries = 0; (fd = flow_accept(&qs, NULL)) < 0; ++tries) {
                printf("accept failed %d\n", fd);
                fflush(stdout);
                if (tries == 4)
                        return 1;
        }
        printf("accepted timeout %u\n", qs.timeout);
        fflush(stdout);
        last = now_ms();
        while (1) {
                n = read_some(fd, buf, sizeof(buf), -1);
                if (n < 0) {
                        printf("ended %zd after %ld ms\n", n, now_ms() - last);
                        fflush(stdout);
                        flow_dealloc(fd);
                        return 0;
                }
                last = now_ms();
                printf("got %.*s\n", (int) n, buf);
                fflush(stdout);
                flow_write(fd, buf, n);
        }
}

static uint8_t pattern(long off)
{
        return (uint8_t) ((uint32_t) (off / 4) >> (8 * (3 - off % 4)));
}

static int sink(long bytes, long delay_us, long hold_ms)
{
        qosspec_t qs;
        uint8_t   buf[16384];
        long      off  = 0;
        long      sdus = 0;
        long      t0;
        ssize_t   n;
        ssize_t   i;
        int       fd;
        int       tries;

        for (tries = 0; (fd = flow_accept(&qs, NULL)) < 0; ++tries) {
                printf("accept failed %d\n", fd);
                if (tries == 4)
                        return 1;
        }
        printf("accepted in_order %u loss %u\n", qs.in_order, qs.loss);
        t0 = now_ms();
        while (off < bytes) {
                if (delay_us > 0)
                        usleep(delay_us);
                n = read_some(fd, (char *) buf, sizeof(buf), 30000);
                if (n < 0) {
                        printf("sink ended %zd at %ld\n", n, off);
                        return 1;
                }
                for (i = 0; i < n; ++i) {
                        if (off + i >= bytes || buf[i] != pattern(off + i)) {
                                printf("sink bad at %ld (sdu %ld of %zd bytes)\n", off + i, sdus, n);
                                return 1;
                        }
                }
                off += n;
                ++sdus;
        }
        printf("sink ok %ld bytes %ld sdus %ld ms\n", off, sdus, now_ms() - t0);
        /* Our final ack may be lost: reading on, the library acks the sender's copies. */
        n = read_some(fd, (char *) buf, sizeof(buf), hold_ms);
        if (n != -ETIMEDOUT)
                printf("sink extra %zd\n", n);
        flow_dealloc(fd);
        printf("sink deallocated\n");
        return 0;
}

static int source(const char * name, long bytes, long sdu)
{
        qosspec_t qs = qos_data;
        uint8_t   buf[16384];
        long      off = 0;
        long      t0;
        long      len;
        long      i;
        ssize_t   n;
        int       fd;
        int       tries;

        if (sdu <= 0 || sdu > (long) sizeof(buf))
                return 2;
        for (tries = 0; (fd = flow_alloc(name, &qs, NULL)) < 0; ++tries) {
                printf("alloc failed %d\n", fd);
                if (tries == 2)
                        return 1;
        }
        t0 = now_ms();
        while (off < bytes) {
                len = bytes - off < sdu ? bytes - off : sdu;
                for (i = 0; i < len; ++i)
                        buf[i] = pattern(off + i);
                n = flow_write(fd, buf, len);
                if (n != len) {
                        printf("source write failed %zd at %ld\n", n, off);
                        return 1;
                }
                off += len;
        }
        printf("source written %ld bytes %ld ms\n", off, now_ms() - t0);
        t0 = now_ms();
        flow_dealloc(fd);
        printf("source deallocated after %ld ms\n", now_ms() - t0);
        return 0;
}

int main(int argc, char ** argv)
{
        setvbuf(stdout, NULL, _IOLBF, 0);
        if (argc == 5 && strcmp(argv[1], "client") == 0)
                return client(argv[2], atoi(argv[3]), atoi(argv[4]));
        if (argc == 2 && strcmp(argv[1], "server") == 0)
                return server();
        if (argc == 5 && strcmp(argv[1], "sink") == 0)
                return sink(atol(argv[2]), atol(argv[3]), atol(argv[4]));
        if (argc == 5 && strcmp(argv[1], "source") == 0)
                return source(argv[2], atol(argv[3]), atol(argv[4]));
        fprintf(stderr, "usage: o7s_peer client NAME TIMEOUT_MS IDLE_MS | o7s_peer server\n"
                "       o7s_peer sink BYTES DELAY_US HOLD_MS | o7s_peer source NAME BYTES SDU\n");
        return 2;
}
