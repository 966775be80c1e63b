/*
 * pathlab-line: a user-space delay line between two TUN devices.
 *
 * The kernel of the test machines has no sch_netem, so delay, loss, rate and MTU are
 * emulated here. The program creates one TUN device in each of two network namespaces
 * (side A and side B) and copies IP packets between them, one thread per direction:
 *
 *   A --(a2b: partition, MTU, loss, rate, queue limit, delay+jitter)--> B
 *   B --(b2a: the same settings, independently)                      --> A
 *
 * Usage:
 *   pathlab-line NETNS_A TUN_A NETNS_B TUN_B [SETTING ...]
 *
 * NETNS_x is a namespace file (/run/netns/NAME, or "-" for the current namespace).
 * SETTING is KEY=VALUE (both directions) or a2b.KEY=VALUE / b2a.KEY=VALUE:
 *   delay_ms      fixed one-way delay (float, default 0)
 *   jitter_ms     extra delay, uniform in [0, jitter_ms]; packets are never reordered
 *                 (a packet leaves no earlier than the one before it)
 *   loss          Bernoulli loss probability in [0, 1]
 *   ge_p, ge_r    Gilbert-Elliott burst loss: P(good->bad), P(bad->good) per packet;
 *                 active when ge_p > 0, and then it replaces `loss`
 *   ge_bad_loss   loss probability in the bad state (default 1)
 *   ge_good_loss  loss probability in the good state (default 0)
 *   rate_mbit     token-bucket rate limit in Mbit/s (0 = unlimited)
 *   burst_bytes   token-bucket depth (default: 1 ms at the rate, at least 64 KiB)
 *   mtu           IP packets longer than this are dropped silently, no ICMP (a path-MTU
 *                 black hole; 0 = no limit)
 *   limit         queue limit in packets per direction (tail drop; default 10000,
 *                 fixed maximum at start)
 *   partition     1: drop every packet, also those already queued; 0: heal
 *   seed          (start only) seed of the loss generators (default 1)
 *   max_packet    (start only) slot size, the largest packet read (default 65535)
 *
 * Control on stdin, one command a line, each answered with one line on stdout:
 *   set SETTING ...      -> "ok" or "error <why>"
 *   partition on|off     -> "ok"
 *   stats                -> "stats a2b rx=.. tx=.. loss=.. partition=.. mtu=.. queue=.. bytes=..
 *                            b2a ..."
 * "ready" is printed once both devices exist. EOF on stdin, SIGTERM or SIGINT end the
 * program (the TUN devices vanish with it). SIGUSR1 partitions, SIGUSR2 heals.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    double delay_ms, jitter_ms, loss;
    double ge_p, ge_r, ge_bad_loss, ge_good_loss;
    double rate_mbit;
    long burst_bytes, mtu, limit;
} params_t;

typedef struct {
    uint64_t rx, tx, drop_loss, drop_partition, drop_mtu, drop_queue, bytes_tx;
} stats_t;

typedef struct {
    const char *name;
    int index; /* 0 = a2b, 1 = b2a */
    int in_fd, out_fd;
    params_t p;
    unsigned version;
    uint64_t rng;
    int ge_bad;
    uint64_t tat_ns;       /* token bucket: theoretical arrival time */
    uint64_t last_release; /* FIFO: never release before the previous packet */
    uint8_t *buf;
    size_t slot;
    uint32_t cap, head, count;
    uint32_t *len;
    uint64_t *release;
    stats_t st;
} dir_t;

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static params_t g_params[2];
static volatile unsigned g_version = 1;
static volatile int g_partition[2];
static volatile sig_atomic_t g_stop;
static dir_t g_dirs[2];
static uint64_t g_seed = 1;
static size_t g_max_packet = 65535;

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("pathlab-line: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t splitmix64(uint64_t *s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static double uniform(uint64_t *s) { return (double)(splitmix64(s) >> 11) * 0x1.0p-53; }

static void defaults(params_t *p) {
    memset(p, 0, sizeof *p);
    p->ge_bad_loss = 1.0;
    p->limit = 10000;
}

/* Apply one KEY=VALUE (optionally a2b./b2a.-prefixed) to params[2]. 0 ok, -1 error. */
static int apply(params_t *params, const char *item, int at_start, char *err, size_t errlen) {
    int first = 0, last = 1;
    const char *kv = item;
    if (strncmp(item, "a2b.", 4) == 0) {
        last = 0;
        kv = item + 4;
    } else if (strncmp(item, "b2a.", 4) == 0) {
        first = 1;
        kv = item + 4;
    }
    const char *eq = strchr(kv, '=');
    if (eq == NULL) {
        snprintf(err, errlen, "expected KEY=VALUE, got '%s'", item);
        return -1;
    }
    char key[32];
    size_t klen = (size_t)(eq - kv);
    if (klen == 0 || klen >= sizeof key) {
        snprintf(err, errlen, "bad key in '%s'", item);
        return -1;
    }
    memcpy(key, kv, klen);
    key[klen] = 0;
    char *end;
    errno = 0;
    double v = strtod(eq + 1, &end);
    if (errno || end == eq + 1 || *end != 0 || !isfinite(v)) {
        snprintf(err, errlen, "bad number in '%s'", item);
        return -1;
    }
    if (strcmp(key, "seed") == 0 || strcmp(key, "max_packet") == 0) {
        if (!at_start || first != 0 || last != 1) {
            snprintf(err, errlen, "%s can only be given at start, for both directions", key);
            return -1;
        }
        if (v < 0) {
            snprintf(err, errlen, "%s must be >= 0", key);
            return -1;
        }
        if (key[0] == 's')
            g_seed = (uint64_t)v;
        else if (v < 576 || v > 65535) {
            snprintf(err, errlen, "max_packet must be in [576, 65535]");
            return -1;
        } else
            g_max_packet = (size_t)v;
        return 0;
    }
    if (strcmp(key, "partition") == 0) {
        for (int i = first; i <= last; i++) __atomic_store_n(&g_partition[i], v != 0, __ATOMIC_SEQ_CST);
        return 0;
    }
    int prob = !strcmp(key, "loss") || !strcmp(key, "ge_p") || !strcmp(key, "ge_r") ||
               !strcmp(key, "ge_bad_loss") || !strcmp(key, "ge_good_loss");
    if (prob && (v < 0 || v > 1)) {
        snprintf(err, errlen, "%s must be in [0, 1]", key);
        return -1;
    }
    if (v < 0) {
        snprintf(err, errlen, "%s must be >= 0", key);
        return -1;
    }
    for (int i = first; i <= last; i++) {
        params_t *p = &params[i];
        if (!strcmp(key, "delay_ms")) p->delay_ms = v;
        else if (!strcmp(key, "jitter_ms")) p->jitter_ms = v;
        else if (!strcmp(key, "loss")) p->loss = v;
        else if (!strcmp(key, "ge_p")) p->ge_p = v;
        else if (!strcmp(key, "ge_r")) p->ge_r = v;
        else if (!strcmp(key, "ge_bad_loss")) p->ge_bad_loss = v;
        else if (!strcmp(key, "ge_good_loss")) p->ge_good_loss = v;
        else if (!strcmp(key, "rate_mbit")) p->rate_mbit = v;
        else if (!strcmp(key, "burst_bytes")) p->burst_bytes = (long)v;
        else if (!strcmp(key, "mtu")) p->mtu = (long)v;
        else if (!strcmp(key, "limit")) {
            if (v < 1 || v > (at_start ? 1u << 20 : g_dirs[i].cap - 1)) {
                snprintf(err, errlen, "limit must be in [1, %u]", at_start ? 1u << 20 : g_dirs[i].cap - 1);
                return -1;
            }
            p->limit = (long)v;
        } else {
            snprintf(err, errlen, "unknown setting '%s'", key);
            return -1;
        }
    }
    return 0;
}

static int open_tun(const char *ns_path, const char *name) {
    int self_ns = open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC);
    if (self_ns < 0) die("open /proc/self/ns/net: %s", strerror(errno));
    if (strcmp(ns_path, "-") != 0) {
        int ns = open(ns_path, O_RDONLY | O_CLOEXEC);
        if (ns < 0) die("open %s: %s", ns_path, strerror(errno));
        if (setns(ns, CLONE_NEWNET) < 0) die("setns %s: %s", ns_path, strerror(errno));
        close(ns);
    }
    int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
    if (fd < 0) die("open /dev/net/tun: %s", strerror(errno));
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = IFF_TUN | IFF_NO_PI;
    if (strlen(name) >= IFNAMSIZ) die("device name too long: %s", name);
    strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0) die("TUNSETIFF %s in %s: %s", name, ns_path, strerror(errno));
    if (fcntl(fd, F_SETFL, O_NONBLOCK) < 0) die("O_NONBLOCK: %s", strerror(errno));
    if (setns(self_ns, CLONE_NEWNET) < 0) die("setns back: %s", strerror(errno));
    close(self_ns);
    return fd;
}

/* Loss decision for one packet (Bernoulli, or Gilbert-Elliott when ge_p > 0). */
static int lost(dir_t *d) {
    const params_t *p = &d->p;
    if (p->ge_p > 0) {
        double u = uniform(&d->rng);
        if (!d->ge_bad && u < p->ge_p) d->ge_bad = 1;
        else if (d->ge_bad && u < p->ge_r) d->ge_bad = 0;
        double l = d->ge_bad ? p->ge_bad_loss : p->ge_good_loss;
        return l > 0 && uniform(&d->rng) < l;
    }
    return p->loss > 0 && uniform(&d->rng) < p->loss;
}

static void refresh(dir_t *d) {
    unsigned v = __atomic_load_n(&g_version, __ATOMIC_ACQUIRE);
    if (v == d->version) return;
    pthread_mutex_lock(&g_lock);
    d->p = g_params[d->index];
    d->version = g_version;
    pthread_mutex_unlock(&g_lock);
}

#define BUMP(field) __atomic_fetch_add(&d->st.field, 1, __ATOMIC_RELAXED)

static void *run_dir(void *arg) {
    dir_t *d = arg;
    for (;;) {
        if (g_stop) return NULL;
        refresh(d);
        int part = __atomic_load_n(&g_partition[d->index], __ATOMIC_RELAXED);
        uint64_t now = now_ns();
        /* 1. Deliver what is due. */
        while (d->count > 0 && d->release[d->head] <= now) {
            uint32_t h = d->head;
            if (part) {
                BUMP(drop_partition);
            } else {
                ssize_t w = write(d->out_fd, d->buf + (size_t)h * d->slot, d->len[h]);
                if (w < 0) {
                    BUMP(drop_queue); /* device down or full: the packet is gone */
                } else {
                    BUMP(tx);
                    __atomic_fetch_add(&d->st.bytes_tx, (uint64_t)w, __ATOMIC_RELAXED);
                }
            }
            d->head = (h + 1) % d->cap;
            d->count--;
        }
        /* 2. Sleep until a packet arrives or the next one is due (at most 100 ms). */
        uint64_t wait = 100000000ull;
        if (d->count > 0 && d->release[d->head] - now < wait) wait = d->release[d->head] - now;
        struct timespec ts = {(time_t)(wait / 1000000000ull), (long)(wait % 1000000000ull)};
        struct pollfd pfd = {d->in_fd, d->count < d->cap ? POLLIN : 0, 0};
        int r = ppoll(&pfd, 1, &ts, NULL);
        if (r < 0 && errno != EINTR) die("%s: ppoll: %s", d->name, strerror(errno));
        if (r <= 0 || !(pfd.revents & POLLIN)) continue;
        /* 3. Read a batch; each packet is dropped or queued with its release time. */
        for (int batch = 0; batch < 64 && d->count < d->cap; batch++) {
            uint32_t t = (d->head + d->count) % d->cap;
            uint8_t *slot = d->buf + (size_t)t * d->slot;
            ssize_t n = read(d->in_fd, slot, d->slot);
            if (n < 0) {
                if (errno == EAGAIN || errno == EINTR) break;
                die("%s: read: %s", d->name, strerror(errno));
            }
            if (n == 0) break;
            BUMP(rx);
            refresh(d); /* per packet: a `set` answered "ok" applies to the next packet */
            now = now_ns();
            const params_t *p = &d->p;
            if (__atomic_load_n(&g_partition[d->index], __ATOMIC_RELAXED)) {
                BUMP(drop_partition);
                continue;
            }
            if (p->mtu > 0 && n > p->mtu) {
                BUMP(drop_mtu);
                continue;
            }
            if (lost(d)) {
                BUMP(drop_loss);
                continue;
            }
            if ((long)d->count >= p->limit) {
                BUMP(drop_queue);
                continue;
            }
            uint64_t depart = now;
            if (p->rate_mbit > 0) {
                double bytes_per_ns = p->rate_mbit * 1e6 / 8 / 1e9;
                long burst = p->burst_bytes;
                if (burst <= 0) { /* default: 1 ms at the rate, at least 64 KiB */
                    burst = (long)(bytes_per_ns * 1e6);
                    if (burst < 65536) burst = 65536;
                }
                uint64_t burst_ns = (uint64_t)(burst / bytes_per_ns);
                if (d->tat_ns < now) d->tat_ns = now;
                d->tat_ns += (uint64_t)(n / bytes_per_ns);
                if (d->tat_ns > now + burst_ns) depart = d->tat_ns - burst_ns;
            }
            double delay = p->delay_ms;
            if (p->jitter_ms > 0) delay += uniform(&d->rng) * p->jitter_ms;
            uint64_t release = depart + (uint64_t)(delay * 1e6);
            if (release < d->last_release) release = d->last_release;
            d->last_release = release;
            d->release[t] = release;
            d->len[t] = (uint32_t)n;
            d->count++;
        }
    }
}

static void on_signal(int sig) {
    if (sig == SIGUSR1 || sig == SIGUSR2) {
        g_partition[0] = g_partition[1] = (sig == SIGUSR1);
    } else {
        g_stop = 1;
    }
}

static void print_stats(void) {
    printf("stats");
    for (int i = 0; i < 2; i++) {
        stats_t *s = &g_dirs[i].st;
#define LD(f) (unsigned long long)__atomic_load_n(&s->f, __ATOMIC_RELAXED)
        printf(" %s rx=%llu tx=%llu loss=%llu partition=%llu mtu=%llu queue=%llu bytes=%llu",
               g_dirs[i].name, LD(rx), LD(tx), LD(drop_loss), LD(drop_partition), LD(drop_mtu),
               LD(drop_queue), LD(bytes_tx));
#undef LD
    }
    printf("\n");
}

static void command(char *line) {
    char err[160] = "";
    size_t n = strlen(line);
    while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r' || line[n - 1] == ' ')) line[--n] = 0;
    if (n == 0) return;
    if (strcmp(line, "stats") == 0) {
        print_stats();
    } else if (strcmp(line, "partition on") == 0 || strcmp(line, "partition off") == 0) {
        int on = line[11] == 'n';
        __atomic_store_n(&g_partition[0], on, __ATOMIC_SEQ_CST);
        __atomic_store_n(&g_partition[1], on, __ATOMIC_SEQ_CST);
        printf("ok\n");
    } else if (strncmp(line, "set ", 4) == 0) {
        params_t next[2];
        pthread_mutex_lock(&g_lock);
        memcpy(next, g_params, sizeof next);
        pthread_mutex_unlock(&g_lock);
        int ok = 1;
        for (char *save = NULL, *tok = strtok_r(line + 4, " ", &save); tok && ok;
             tok = strtok_r(NULL, " ", &save))
            ok = apply(next, tok, 0, err, sizeof err) == 0;
        if (ok) {
            pthread_mutex_lock(&g_lock);
            memcpy(g_params, next, sizeof next);
            __atomic_add_fetch(&g_version, 1, __ATOMIC_RELEASE);
            pthread_mutex_unlock(&g_lock);
            printf("ok\n");
        } else {
            printf("error %s\n", err);
        }
    } else {
        printf("error unknown command (set KEY=VALUE..., partition on|off, stats)\n");
    }
    fflush(stdout);
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: %s NETNS_A TUN_A NETNS_B TUN_B [KEY=VALUE ...]\n", argv[0]);
        return 2;
    }
    /* No PR_SET_PDEATHSIG: it fires when the parent *thread* exits. The parent holds
     * our stdin; its death closes the pipe and the EOF below ends us. */
    defaults(&g_params[0]);
    defaults(&g_params[1]);
    char err[160];
    for (int i = 5; i < argc; i++)
        if (apply(g_params, argv[i], 1, err, sizeof err) < 0) {
            fprintf(stderr, "pathlab-line: %s\n", err);
            return 2;
        }
    int fd_a = open_tun(argv[1], argv[2]);
    int fd_b = open_tun(argv[3], argv[4]);

    for (int i = 0; i < 2; i++) {
        dir_t *d = &g_dirs[i];
        d->name = i == 0 ? "a2b" : "b2a";
        d->index = i;
        d->in_fd = i == 0 ? fd_a : fd_b;
        d->out_fd = i == 0 ? fd_b : fd_a;
        d->rng = g_seed * 2 + (uint64_t)i;
        d->slot = (g_max_packet + 63) & ~(size_t)63;
        d->cap = (uint32_t)g_params[i].limit + 1; /* the limit check drops before it fills */
        d->buf = calloc(d->cap, d->slot); /* large: mmap'ed lazily, touched as used */
        d->len = calloc(d->cap, sizeof *d->len);
        d->release = calloc(d->cap, sizeof *d->release);
        if (!d->buf || !d->len || !d->release) die("out of memory");
        d->p = g_params[i];
        d->version = g_version;
    }

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal; /* no SA_RESTART: a signal interrupts the stdin read */
    sigemptyset(&sa.sa_mask);
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old); /* the worker threads take no signals */
    pthread_t th[2];
    for (int i = 0; i < 2; i++)
        if (pthread_create(&th[i], NULL, run_dir, &g_dirs[i]) != 0) die("pthread_create");
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    int sigs[] = {SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2};
    for (size_t i = 0; i < sizeof sigs / sizeof *sigs; i++) sigaction(sigs[i], &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    printf("ready\n");
    fflush(stdout);
    char line[4096];
    size_t used = 0;
    while (!g_stop) {
        ssize_t r = read(0, line + used, sizeof line - 1 - used);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        used += (size_t)r;
        line[used] = 0;
        char *nl;
        while ((nl = strchr(line, '\n')) != NULL) {
            *nl = 0;
            command(line);
            size_t rest = used - (size_t)(nl + 1 - line);
            memmove(line, nl + 1, rest);
            used = rest;
            line[used] = 0;
        }
        if (used == sizeof line - 1) used = 0; /* overlong line: discard */
    }
    g_stop = 1;
    for (int i = 0; i < 2; i++) pthread_join(th[i], NULL);
    return 0;
}
