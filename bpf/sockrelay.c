// SPDX-License-Identifier: GPL-2.0
//go:build ignore

// The kernel datapath of sockrelay. Each tunnel's two sockets are in two sockhashes keyed by socket
// cookie: `targets`, which carries no program and only makes a socket a redirect target, and `verdict_map`,
// whose stream verdict program below runs on every skb a socket receives and redirects it to the egress of
// the socket's peer. Userspace inserts both sockets into `targets` before either goes into `verdict_map`, so
// no verdict can run before its peer is a valid target (shared/DATAPATH.md, hazard 3).

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

char __license[] SEC("license") = "GPL";

// sock_info is written by userspace before a socket is inserted and only read here.
struct sock_info {
	__u64 peer; // cookie of the socket this one's bytes go to
};

// sock_stats is created zeroed by userspace before insertion and then written only here, in place, so
// userspace can read live counters. Runs of the verdict for one socket are serialized by the socket's
// receive path, so plain adds do not race with each other.
struct sock_stats {
	__u64 bytes;   // bytes redirected to the peer
	__u64 skbs;    // skbs redirected
	__u64 last_ns; // bpf_ktime_get_ns() of the last skb, for idle timeouts
	__u64 dropped; // skbs whose redirect failed (peer gone): the verdict dropped them
};

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

// The two hash maps are not preallocated: a deleted element is then freed only after an RCU grace period,
// so a verdict still running on another CPU when its tunnel is removed writes into memory no other socket
// owns yet.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1 << 17);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, struct sock_info);
} socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1 << 17);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, struct sock_stats);
} stats SEC(".maps");

SEC("sk_skb/stream_verdict")
int sockrelay_verdict(struct __sk_buff *skb)
{
	// A FIN that rides on no data reaches the verdict as an empty skb. TCP has already marked the socket
	// shut for reading (tcp_fin), which is what userspace watches (EPOLLRDHUP), so the skb carries nothing
	// anyone needs. It is dropped rather than passed so that no zero-length skb ever enters a psock queue.
	// Measured here (6.18, this session): passing or dropping it made no difference to the duplex suite
	// or to a FIN arriving while the socket's peer direction was backed up (all byte-exact either way).
	if (skb->len == 0)
		return SK_DROP;

	__u64 cookie = bpf_get_socket_cookie(skb);
	struct sock_info *info = bpf_map_lookup_elem(&socks, &cookie);
	struct sock_stats *st = bpf_map_lookup_elem(&stats, &cookie);
	if (!info || !st)
		return SK_PASS; // not a tunnel socket (or being torn down): leave the bytes with it

	__u64 peer = info->peer;
	long verdict = bpf_sk_redirect_hash(skb, &targets, &peer, 0);
	if (verdict == SK_PASS) {
		st->bytes += skb->len;
		st->skbs++;
		st->last_ns = bpf_ktime_get_ns();
	} else {
		st->dropped++;
	}
	return verdict;
}
