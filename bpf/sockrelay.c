// SPDX-License-Identifier: GPL-2.0
//go:build ignore

// The kernel datapath of sockrelay. Each tunnel's two sockets are in two sockhashes keyed by socket
// cookie: `targets`, which carries no program and only makes a socket a redirect target, and `verdict_map`,
// whose stream verdict program below runs on every skb a socket receives and redirects it to the egress of
// the socket's peer. Userspace inserts both sockets into `targets` before either goes into `verdict_map`, so
// no verdict can run before its peer is a valid target (docs/datapath.md, "How a tunnel enters the kernel").
//
// Backpressure (docs/datapath.md, "Backpressure"). A redirected skb leaves the source's receive queue at
// once and waits in the peer's psock queue, charged to no socket, until the peer's send buffer takes it:
// the source's TCP window never closes, and a reader that stops would let the kernel hold without bound. So before each
// redirect the verdict measures what it holds for this direction, bytes it redirected minus bytes that
// entered the peer's send queue (the peer's write_seq), and past the socket's limit it demotes the socket:
// from then on it passes skbs (SK_PASS) to the socket's own receive queue, where they are charged to its
// receive buffer, so its window closes and the sender is throttled. Userspace, told by a ring buffer event,
// reads the passed bytes and writes them on with ordinary backpressure, and asks to resume; the verdict
// returns to redirecting at the first skb that finds every passed byte consumed, so no byte overtakes one
// that userspace still holds.
//
// Cost. The verdict runs once per skb, so it does as little as it can: one hash lookup for the socket's
// whole state (`socks`, keyed by cookie; sk_skb programs cannot use socket-local storage, and userspace
// must reach the state by cookie), the peer's send sequence read only when what is held could be near the
// limit, and the coarse clock (tick resolution) for the time of the last skb.

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

char __license[] SEC("license") = "GPL";

struct sk_buff {
	char cb[48];
} __attribute__((preserve_access_index));

extern void *bpf_cast_to_kern_ctx(void *obj) __ksym __weak;

// Only the fields read here; CO-RE relocates their offsets to the running kernel's struct tcp_sock (BTF).
struct tcp_sock {
	__u32 copied_seq; // sequence number of the next byte not yet consumed from the receive path
	__u32 write_seq;  // sequence number after the last byte queued for sending
} __attribute__((preserve_access_index));

// sock_info is what userspace tells the verdict about a socket. Userspace writes it through set_control,
// field by field in place, and the verdict reads each field once per run. A run may see some fields of an
// update and not others; that is safe because each field alone is true: peer never changes, user_read and
// user_written only grow, and each counts bytes userspace has already written to the peer.
struct sock_info {
	__u64 peer;         // cookie of the socket this one's bytes go to
	__u64 limit;        // most bytes held in the kernel for this direction before demotion; 0: no limit
	__u64 user_read;    // bytes of passed skbs userspace has read from this socket and written to the peer
	__u64 user_written; // bytes userspace wrote into the peer after the insertion (all of them passed bytes)
	__u64 resume_gen;   // userspace asks to resume redirecting after demotion number resume_gen
};

enum {
	MODE_REDIRECT = 0,
	MODE_PASS = 1, // demoted: skbs go to the socket's own receive queue, for userspace to relay
};

// sock_stats is created zeroed by userspace before insertion and then written only by the verdict, in
// place, so userspace can read live counters. Runs of the verdict for one socket are serialized by the
// socket's receive path, so plain adds do not race with each other.
struct sock_stats {
	__u64 bytes;     // bytes redirected to the peer
	__u64 skbs;      // skbs redirected
	__u64 last_ns;   // CLOCK_MONOTONIC_COARSE (bpf_ktime_get_coarse_ns) of the last skb, for idle timeouts
	__u64 dropped;   // skbs whose redirect failed (peer gone): the verdict dropped them
	__u64 passed;    // bytes passed to this socket's own receive queue while demoted
	__u64 demotions; // times this socket was demoted
	__u32 mode;      // MODE_*
	__u32 peer_seq0; // the peer's write_seq at this socket's first redirect (valid once seq0_set)
	__u32 seq0_set;
	__u32 next_seq; // TCP sequence number of the next byte the verdict expects (valid once seq_set)
	__u32 seq_set;
	__u32 broken;   // a repeated head could not be cut off: every later skb is dropped, userspace resets
	__u64 overlaps;      // skbs that began with bytes already delivered
	__u64 overlap_bytes; // bytes cut off them
	__u32 handed;        // bytes of this direction that had entered the peer's send queue at its last read
	__u32 pad;
	__u64 peer_reads;    // reads of the peer's send sequence
};

// tunnel_sock is a socket's entry in `socks`: userspace's part and the verdict's, under one key so that
// the verdict finds both with one lookup.
struct tunnel_sock {
	struct sock_info ctl;
	struct sock_stats st;
};

// control_args is set_control's input: which socket, and its new sock_info.
struct control_args {
	__u64 cookie;
	struct sock_info ctl;
};

// A change of mode: a demotion, for userspace to start relaying the socket's passed bytes, or a resume, for
// the goroutine that relays them to stop.
enum {
	EVENT_DEMOTED = 0,
	EVENT_RESUMED = 1,
	EVENT_BROKEN = 2, // see sock_stats.broken
};

struct mode_event {
	__u64 cookie;
	__u64 demotions;
	__u64 kind; // EVENT_*
};

// Events that did not fit in the ring buffer; userspace reports them, they must stay 0.
volatile __u64 events_lost = 0;

#define READ_ONCE(x) (*(volatile typeof(x) *)&(x))
#define WRITE_ONCE(x, v) (*(volatile typeof(x) *)&(x) = (v))

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 1 << 17);
	__type(key, __u64);
	__type(value, __u64);
} targets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 1 << 17);
	__type(key, __u64);
	__type(value, __u64);
} verdict_map SEC(".maps");

// Not preallocated: a deleted element is then freed only after an RCU grace period, so a verdict still
// running on another CPU when its tunnel is removed writes into memory no other socket owns yet.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1 << 17);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, struct tunnel_sock);
} socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 << 10);
} events SEC(".maps");

static __always_inline void notify(__u64 cookie, __u64 demotions, __u64 kind)
{
	struct mode_event ev = {.cookie = cookie, .demotions = demotions, .kind = kind};
	if (bpf_ringbuf_output(&events, &ev, sizeof(ev), 0))
		__sync_fetch_and_add(&events_lost, 1);
}

// trim_head cuts n bytes off the front of skb, 4095 at most per bpf_skb_adjust_room call (its limit for
// sk_skb), up to 32 calls (128 KiB). It returns 0, or a negative number when it could not cut them all.
static __always_inline int trim_head(struct __sk_buff *skb, __u32 n)
{
	for (int i = 0; i < 32 && n > 0; i++) {
		__u32 step = n > 4095 ? 4095 : n;
		if (step > skb->len)
			return -1;
		if (bpf_skb_adjust_room(skb, -(__s32)step, 0, 0))
			return -1;
		n -= step;
	}
	return n ? -1 : 0;
}

// tcp_seqs reads copied_seq and write_seq of the tunnel socket whose cookie is given; it returns 0 when the
// socket is not in the targets map.
static __always_inline int tcp_seqs(__u64 *cookie, __u32 *copied, __u32 *written)
{
	struct bpf_sock *sk = bpf_map_lookup_elem(&targets, cookie);
	if (!sk)
		return 0;
	int ok = 0;
	struct tcp_sock *tp = bpf_skc_to_tcp_sock(sk);
	if (tp) {
		*copied = tp->copied_seq;
		*written = tp->write_seq;
		ok = 1;
	}
	bpf_sk_release(sk);
	return ok;
}

SEC("sk_skb/stream_verdict")
int sockrelay_verdict(struct __sk_buff *skb)
{
	// A FIN that rides on no data reaches the verdict as an empty skb. TCP has already marked the socket
	// shut for reading (tcp_fin), which is what userspace watches (EPOLLRDHUP), so the skb carries nothing
	// anyone needs. It is dropped rather than passed so that no zero-length skb ever enters a psock queue.
	// Measured here (6.18): passing or dropping it made no difference to the duplex suite or to a FIN
	// arriving while the socket's peer direction was backed up (all byte-exact either way).
	if (skb->len == 0)
		return SK_DROP;

	__u64 cookie = bpf_get_socket_cookie(skb);
	struct tunnel_sock *ts = bpf_map_lookup_elem(&socks, &cookie);
	if (!ts)
		return SK_PASS; // not a tunnel socket (or being torn down): leave the bytes with it
	struct sock_info *info = &ts->ctl;
	struct sock_stats *st = &ts->st;

	// TCP can queue a segment that begins before bytes it already delivered: a retransmission cut
	// differently from the original (tcp_data_queue, "partial packet"), or an out-of-order skb that
	// straddles rcv_nxt (tcp_ofo_queue). tcp_recvmsg skips such bytes by their offset from copied_seq;
	// tcp_read_skb, which feeds this program, hands the whole skb over, so without this check those
	// bytes would reach the peer twice. Seen here on 6.18 while a direction was demoted and its window
	// closing: 65 483 bytes (one loopback segment) repeated, a few times per ten 2 GiB transfers.
	// The repeated head is cut off the skb, so that what is redirected or passed (and what TCP counts
	// as consumed, tcp_eat_skb / copied_seq) is only new bytes. Needs bpf_cast_to_kern_ctx (6.2+) to
	// read the skb's sequence number; without it the check is skipped.
	if (bpf_cast_to_kern_ctx) {
		struct sk_buff *kskb = bpf_cast_to_kern_ctx(skb);
		__u32 seq = *(__u32 *)&kskb->cb[0]; // TCP_SKB_CB(skb)->seq
		__u32 expect = st->next_seq;
		int known = st->seq_set;
		if (!known) {
			// First skb since the insertion: nothing has been consumed through the verdict yet, so the
			// socket's copied_seq is the next byte due (userspace read everything before it).
			__u32 written;
			known = tcp_seqs(&cookie, &expect, &written);
		}
		__s32 repeated = known ? (__s32)(expect - seq) : 0;
		if (repeated > 0) {
			__u32 cut = (__u32)repeated < skb->len ? (__u32)repeated : skb->len;
			st->overlaps++;
			st->overlap_bytes += cut;
			if (trim_head(skb, cut) < 0) {
				// The skb cannot be cut: nothing of it may go on, and the stream is broken.
				st->broken = 1;
				notify(cookie, st->demotions, EVENT_BROKEN);
				return SK_DROP;
			}
			if (skb->len == 0) {
				// All of it was repeated; an empty skb costs TCP nothing (tcp_eat_skb skips it).
				st->next_seq = expect;
				st->seq_set = 1;
				return SK_DROP;
			}
			st->next_seq = expect + skb->len;
		} else {
			st->next_seq = seq + skb->len;
		}
		st->seq_set = 1;
	}
	if (st->broken)
		return SK_DROP;

	__u64 peer = READ_ONCE(info->peer);
	if (st->mode == MODE_PASS) {
		// Resume only when userspace holds none of the passed bytes: they are all in the peer's send
		// queue, so this skb, redirected behind them, keeps its place in the stream.
		if (READ_ONCE(info->resume_gen) != st->demotions || READ_ONCE(info->user_read) != st->passed) {
			st->passed += skb->len;
			st->last_ns = bpf_ktime_get_coarse_ns();
			return SK_PASS;
		}
		st->mode = MODE_REDIRECT;
		notify(cookie, st->demotions, EVENT_RESUMED);
	}

	__u64 limit = READ_ONCE(info->limit);
	// What the kernel holds for this direction is at most what it redirected minus what had entered the
	// peer's send queue when that was last read (that only grows). Only when this bound passes the limit
	// is the peer read again: the read takes and drops a reference on a socket another CPU is sending on.
	// Modulo 2^32, as TCP sequence numbers: what is held is far below 2 GiB.
	__s32 bound = (__s32)((__u32)st->bytes - st->handed);
	if (limit && (!st->seq0_set || (bound > 0 && (__u64)bound > limit))) {
		__u32 copied, seq;
		if (tcp_seqs(&peer, &copied, &seq)) {
			if (!st->seq0_set) {
				// First redirect: nothing has been redirected into the peer yet, and userspace
				// writes to it only while this socket is demoted, which has not happened yet.
				st->peer_seq0 = seq;
				st->seq0_set = 1;
			}
			st->peer_reads++;
			__u32 handed = seq - st->peer_seq0 - (__u32)READ_ONCE(info->user_written);
			st->handed = handed;
			__s32 held = (__s32)((__u32)st->bytes - handed);
			if (held > 0 && (__u64)held > limit) {
				st->mode = MODE_PASS;
				st->demotions++;
				notify(cookie, st->demotions, EVENT_DEMOTED);
				st->passed += skb->len;
				st->last_ns = bpf_ktime_get_coarse_ns();
				return SK_PASS;
			}
		}
	}

	long verdict = bpf_sk_redirect_hash(skb, &targets, &peer, 0);
	if (verdict == SK_PASS) {
		st->bytes += skb->len;
		st->skbs++;
		st->last_ns = bpf_ktime_get_coarse_ns();
	} else {
		st->dropped++;
	}
	return verdict;
}

// set_control replaces the sock_info of a socket in `socks` in place, leaving the verdict's part alone;
// userspace runs it (BPF_PROG_RUN) instead of updating the map, which would replace the whole entry. It
// returns 1 when the socket is not in the map. Fields are written in this order so that a verdict that
// sees the new user_read (and may resume) also sees the new user_written on x86, whose stores and loads
// are not reordered. Elsewhere a run may see an older user_written: it then takes userspace's last write
// into the peer for bytes the verdict handed over, and demotes at most that write's size late.
SEC("syscall")
int set_control(struct control_args *args)
{
	__u64 cookie = args->cookie;
	struct tunnel_sock *ts = bpf_map_lookup_elem(&socks, &cookie);
	if (!ts)
		return 1;
	WRITE_ONCE(ts->ctl.peer, args->ctl.peer);
	WRITE_ONCE(ts->ctl.limit, args->ctl.limit);
	WRITE_ONCE(ts->ctl.user_written, args->ctl.user_written);
	WRITE_ONCE(ts->ctl.user_read, args->ctl.user_read);
	WRITE_ONCE(ts->ctl.resume_gen, args->ctl.resume_gen);
	return 0;
}
