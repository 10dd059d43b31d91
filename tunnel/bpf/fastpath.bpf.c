// The tunnel's kernel fast path (tc-BPF), built by tunnel/build.rs with
// clang and loaded by tunnel/src/fastpath.rs.
//
// encap, on the TUN device's egress: a TCP segment (IPv4 or IPv6) routed
// into the tunnel (a 64 KiB GSO super-packet or a packet that fits) gets
// the outer IPv4 (+ UDP for FOU) header and leaves by the WAN interface,
// with no copy and no trip to userspace. The kernel cuts super-packets to
// fit the path as it would for its own tunnels (gso_size shrinks by the
// outer header). A lone segment too big for the tunnel (one a connection
// from before the move sends at its full MSS) is cut in two TCP segments
// that fit, as TSO would cut it, instead of being fragmented in userspace.
//
// decap, on the WAN interface's ingress: an encapsulated TCP segment from
// a configured peer, for an allowed inner destination, loses its outer
// header and enters the TUN device's ingress, as if the userspace data
// plane had written it there.
//
// Anything else takes the ordinary path (PASS) to the userspace data
// plane, which decides, counts and drops as before: SYN, FIN and RST
// segments (flow state, MSS clamping), other protocols, IP options or
// IPv6 extension headers, fragments, link-local addresses, oversize
// packets that cannot be cut (URG, too big to cut in two, or with pmtu
// signalling), unknown peers, unregistered destinations, and anything
// malformed.

#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/in.h>
#include <linux/udp.h>
#include <linux/tcp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

// Shared with tunnel/src/fastpath.rs (Config): addresses and port in
// network byte order.
struct config {
	__u32 local;
	__u32 peer;
	__u32 wan_ifindex;
	__u32 tun_ifindex;
	__u16 fou_port;    // 0: IP-in-IP (protocol 4)
	__u16 max_plain;   // the largest inner packet that fits, unsegmented
	__u32 deliver_any; // 0: only destinations in DELIVER leave the tunnel
	__u32 gateway;     // 1: the gateway's rules (GUESTS) instead of peer and DELIVER
	__u32 signal_pmtu; // 1: segments too big for the tunnel go to userspace (ICMP), not re-cut
};

// The gateway's guests (its data plane's sides), by address.
#define ROLE_OLD 1 // moved away: packets to it go to its peer, its replies come back
#define ROLE_NEW 2 // here: packets for it come from the peer, its own go back unless translated
struct guest {
	__u32 peer;
	__u32 role;
};

// A TCP flow as its packet goes (addresses and ports in network order).
struct flow {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
};

// The same over IPv6.
struct addr6 {
	__u8 a[16];
};

struct flow6 {
	struct addr6 saddr;
	struct addr6 daddr;
	__u16 sport;
	__u16 dport;
};

// What the fast path carried of a flow since userspace last read it.
struct activity {
	__u64 packets;
	__u64 bytes;
};

// tunnel/src/fastpath.rs (Stats)
struct stats {
	__u64 encap_packets;
	__u64 encap_bytes;
	__u64 decap_packets;
	__u64 decap_bytes;
	__u64 errors;
	__u64 split; // lone oversize segments cut in two
};

struct lpm_v4 {
	__u32 prefixlen;
	__u32 addr;
};

struct lpm_v6 {
	__u32 prefixlen;
	__u8 addr[16];
};

// bpf_skb_adjust_room's flag that makes a shrunk packet IPv6 (Linux 6.5;
// older headers lack it)
#define DECAP_L3_IPV6 (1ULL << 8)

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
} CONFIG SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, __u32);
} PEERS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm_v4);
	__type(value, __u32);
} DELIVER SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm_v6);
	__type(value, __u32);
} DELIVER6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, struct guest);
} GUESTS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct addr6);
	__type(value, struct guest);
} GUESTS6 SEC(".maps");

// Flows of guests here that leave translated (the userspace plane's NAT),
// keyed as the guest sends.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct flow);
	__type(value, __u32);
} SLOW SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct flow6);
	__type(value, __u32);
} SLOW6 SEC(".maps");

// Gateway mode: the flows carried, for the drain's bookkeeping (userspace
// reads and clears it every 250 ms).
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct flow);
	__type(value, struct activity);
} ACTIVITY SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct flow6);
	__type(value, struct activity);
} ACTIVITY6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct stats);
} STATS SEC(".maps");

// Not ours: the next program on the hook, if any, then the stack (tcx's
// TCX_NEXT; for a cls_bpf filter, the next filter).
#define PASS TC_ACT_UNSPEC

struct outer {
	struct iphdr ip;
	struct udphdr udp;
};

// The configuration and this CPU's counters: false before userspace has
// filled them in (never, as attached).
static __always_inline int settings(struct config **c, struct stats **st)
{
	__u32 zero = 0;
	*c = bpf_map_lookup_elem(&CONFIG, &zero);
	*st = bpf_map_lookup_elem(&STATS, &zero);
	return *c && *st;
}

static __always_inline int link_local(__u32 addr)
{
	return (addr & bpf_htonl(0xffff0000)) == bpf_htonl(0xa9fe0000);
}

// A TCP segment the fast path may carry: IPv4 without options or
// fragments, neither end link-local, and no SYN, FIN or RST.
static __always_inline struct iphdr *plain_segment(void *at, void *end)
{
	struct iphdr *ip = at;
	if ((void *)(ip + 1) > end)
		return 0;
	if (ip->version != 4 || ip->ihl != 5 || ip->protocol != IPPROTO_TCP ||
	    (ip->frag_off & bpf_htons(0x3fff)))
		return 0;
	if (link_local(ip->saddr) || link_local(ip->daddr))
		return 0;
	struct tcphdr *tcp = (void *)(ip + 1);
	if ((void *)(tcp + 1) > end)
		return 0;
	if (tcp->syn || tcp->fin || tcp->rst)
		return 0;
	return ip;
}

static __always_inline int link_local6(struct in6_addr *a)
{
	return a->in6_u.u6_addr8[0] == 0xfe && (a->in6_u.u6_addr8[1] & 0xc0) == 0x80;
}

// The same for IPv6: no extension headers, neither end link-local.
static __always_inline struct ipv6hdr *plain_segment6(void *at, void *end)
{
	struct ipv6hdr *ip = at;
	if ((void *)(ip + 1) > end)
		return 0;
	if (ip->version != 6 || ip->nexthdr != IPPROTO_TCP || link_local6(&ip->saddr) ||
	    link_local6(&ip->daddr))
		return 0;
	struct tcphdr *tcp = (void *)(ip + 1);
	if ((void *)(tcp + 1) > end)
		return 0;
	if (tcp->syn || tcp->fin || tcp->rst)
		return 0;
	return ip;
}

static __always_inline __u32 headers6(struct ipv6hdr *ip, void *end)
{
	struct tcphdr *tcp = (void *)(ip + 1);
	if ((void *)(tcp + 1) > end)
		return sizeof(struct ipv6hdr) + sizeof(struct tcphdr);
	return sizeof(struct ipv6hdr) + tcp->doff * 4;
}

// IP and TCP header bytes of a segment that plain_segment accepted.
static __always_inline __u32 headers(struct iphdr *ip, void *end)
{
	struct tcphdr *tcp = (void *)(ip + 1);
	if ((void *)(tcp + 1) > end)
		return sizeof(struct iphdr) + sizeof(struct tcphdr);
	return sizeof(struct iphdr) + tcp->doff * 4;
}

// The segments an inner packet of `len` bytes stands for on the wire: a
// GSO super-packet's payload cut at gso_size, or 1.
static __always_inline __u64 segments(struct __sk_buff *skb, __u32 len, __u32 hdrs)
{
	if (!skb->gso_size || len <= hdrs)
		return 1;
	return (len - hdrs + skb->gso_size - 1) / skb->gso_size;
}

static __always_inline struct flow flow_of(struct iphdr *ip, void *end)
{
	struct flow f = {.saddr = ip->saddr, .daddr = ip->daddr};
	struct tcphdr *tcp = (void *)(ip + 1);
	if ((void *)(tcp + 1) <= end) {
		f.sport = tcp->source;
		f.dport = tcp->dest;
	}
	return f;
}

// Counts what was carried of flow `f` in `map` (ACTIVITY or ACTIVITY6).
static __always_inline void note_in(void *map, void *f, __u64 packets, __u64 bytes)
{
	struct activity *a = bpf_map_lookup_elem(map, f);
	if (a) {
		__sync_fetch_and_add(&a->packets, packets);
		__sync_fetch_and_add(&a->bytes, bytes);
	} else {
		struct activity n = {.packets = packets, .bytes = bytes};
		bpf_map_update_elem(map, f, &n, BPF_NOEXIST);
	}
}

static __always_inline void note(struct flow *f, __u64 packets, __u64 bytes)
{
	note_in(&ACTIVITY, f, packets, bytes);
}

static __always_inline struct flow6 flow6_of(struct ipv6hdr *ip, void *end)
{
	struct flow6 f = {};
	__builtin_memcpy(&f.saddr, &ip->saddr, sizeof(f.saddr));
	__builtin_memcpy(&f.daddr, &ip->daddr, sizeof(f.daddr));
	struct tcphdr *tcp = (void *)(ip + 1);
	if ((void *)(tcp + 1) <= end) {
		f.sport = tcp->source;
		f.dport = tcp->dest;
	}
	return f;
}

static __always_inline __u16 ip_checksum(struct iphdr *ip)
{
	__u32 sum = 0;
	__u16 *w = (__u16 *)ip;
#pragma unroll
	for (int i = 0; i < 10; i++)
		sum += w[i];
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return ~sum;
}

// Ones' complement sums (RFC 1071) of 16-bit words as they lie in memory,
// as the kernel's csum helpers keep them: `fold` reduces a sum to 16 bits.
static __always_inline __u32 fold(__u64 s)
{
	s = (s & 0xffffffff) + (s >> 32);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return s;
}

static __always_inline __u32 neg(__u32 a)
{
	return ~a & 0xffff;
}

// The TCP pseudo-header's word that changes when a segment is cut: its
// length. (The addresses and the protocol stay: their sum cancels out.)
static __always_inline __u32 pseudo_len(__u32 l4len)
{
	return bpf_htons(l4len);
}

#define TCP_MAX 60     // TCP header with the most options
#define CHUNK 256      // bytes summed per helper call
#define HEAD_CHUNKS 64 // the first segment's payload is at most 16 KiB
#define TAIL_MAX (CHUNK - 4)
// `n` (1 ≤ n ≤ max, max a power of two) in a form the verifier can bound
#define SIZE(n, max) ((((n) - 1) & ((max) - 1)) + 1)
#define TCP_CWR 0x80
#define TCP_URG 0x20
#define TCP_PSH 0x08

// Sets the TCP checksum at `off` for a segment whose length went from
// `oldlen` to `newlen` bytes and whose ones' complement sum of header
// (checksum field zero), pseudo-header and payload is `total`, whatever
// the skb's checksum state: with CHECKSUM_PARTIAL the field holds the
// pseudo-header's sum only and the kernel's helper changes just that (the
// first call; the second is ignored); otherwise the field holds the full
// checksum, which the second call sets to ~total.
static __always_inline int set_tcp_check(struct __sk_buff *skb, __u32 off, __u32 oldlen,
					 __u32 newlen, __u32 total)
{
	if (bpf_l4_csum_replace(skb, off, bpf_htons(oldlen), bpf_htons(newlen),
				BPF_F_PSEUDO_HDR | 2))
		return -1;
	__u16 now;
	if (bpf_skb_load_bytes(skb, off, &now, sizeof(now)))
		return -1;
	// the helper computes fold(diff + ~now) and complements it
	return bpf_l4_csum_replace(skb, off, 0, fold((__u64)total + now), 0) ? -1 : 0;
}

// Sum of a TCP header of `th` bytes as `tcp` holds it, its checksum field
// taken as zero.
static __always_inline __u32 header_sum(__u8 *tcp, __u32 th)
{
	if (th < sizeof(struct tcphdr) || th > TCP_MAX)
		return 0;
	__u32 s = (__u32)bpf_csum_diff(0, 0, (__be32 *)tcp, SIZE(th, 64), 0);
	return fold((__u64)s + neg(((struct tcphdr *)tcp)->check));
}

// split's working space, too big for the BPF stack (the program never
// runs twice at once on a CPU: tc runs with bottom halves off, and the
// first half's second run through encap fits, so does not split).
struct scratch {
	__u8 buf[CHUNK];
	__u8 tcp[64]; // TCP_MAX, rounded up for the verifier
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct scratch);
} SCRATCH SEC(".maps");

// A part's IP header: `l4len` bytes of TCP behind it; the IPv4 header
// (`ip`, the original's) with its ID counted up by `part`.
static __always_inline int store_l3(struct __sk_buff *skb, int v6, struct iphdr *ip, __u32 l4len,
				    __u16 part)
{
	if (v6) {
		__be16 plen = bpf_htons(l4len);
		return bpf_skb_store_bytes(skb, offsetof(struct ipv6hdr, payload_len), &plen,
					   sizeof(plen), 0);
	}
	struct iphdr h = *ip;
	h.tot_len = bpf_htons(sizeof(h) + l4len);
	h.id = bpf_htons(bpf_ntohs(ip->id) + part);
	h.check = 0;
	h.check = ip_checksum(&h);
	return bpf_skb_store_bytes(skb, 0, &h, sizeof(h), 0);
}

// Cuts a lone TCP segment (IPv4 or, with `v6`, IPv6 at the skb's start,
// no GSO) that is too big for the tunnel in two, as TSO would: the first,
// of `max_plain` bytes at most, leaves at once (a clone sent through the
// TUN device's egress again, so through this program, which encapsulates
// it); the skb becomes the second, the rest of the payload (at most
// TAIL_MAX bytes). Sequence numbers, lengths, flags (PSH on the second
// only, CWR on the first), IPv4 ID and checksums are those TSO would
// give; a segment whose checksum was wrong yields two whose checksums
// are wrong. Returns 1 when the segment cannot be cut (the skb untouched:
// userspace fragments it), 0 when cut, -1 on failure after it was
// changed.
static __always_inline int split(struct __sk_buff *skb, struct config *c, int v6)
{
	__u32 zero = 0;
	struct scratch *sc = bpf_map_lookup_elem(&SCRATCH, &zero);
	if (!sc)
		return 1;
	__u8 *tcp = sc->tcp, *buf = sc->buf;
	struct iphdr ip = {};
	struct ipv6hdr ip6 = {};
	__u32 l3 = v6 ? sizeof(ip6) : sizeof(ip);
	__u32 len = skb->len;
	if (v6) {
		if (bpf_skb_load_bytes(skb, 0, &ip6, sizeof(ip6)) ||
		    bpf_ntohs(ip6.payload_len) + sizeof(ip6) != len)
			return 1;
	} else if (bpf_skb_load_bytes(skb, 0, &ip, sizeof(ip)) || bpf_ntohs(ip.tot_len) != len) {
		return 1;
	}
	if (bpf_skb_load_bytes(skb, l3, tcp, sizeof(struct tcphdr)))
		return 1;
	struct tcphdr *th = (struct tcphdr *)tcp;
	__u32 thlen = th->doff * 4;
	__u8 flags = tcp[13];
	if (thlen < sizeof(struct tcphdr) || thlen > TCP_MAX || (flags & TCP_URG))
		return 1;
	if (bpf_skb_load_bytes(skb, l3, tcp, SIZE(thlen, 64)))
		return 1;
	__u32 hdrs = l3 + thlen;
	if (c->max_plain < hdrs + 4 || len <= c->max_plain)
		return 1;
	__u32 n = len - hdrs;		       // payload
	__u32 k = (c->max_plain - hdrs) & ~3u; // the first segment's payload
	__u32 t = n - k;		       // the second's
	// (the second's payload is written over the first's, cut short)
	if (t == 0 || t > TAIL_MAX || t > k || k > HEAD_CHUNKS * CHUNK)
		return 1;
	// the sum of the first segment's payload, read as it is
	__u64 head = 0;
	for (int i = 0; i < HEAD_CHUNKS; i++) {
		__u32 at = i * CHUNK;
		if (at >= k)
			break;
		__u32 m = k - at;
		if (m > CHUNK)
			m = CHUNK;
		m = SIZE(m, CHUNK); // k is a multiple of 4: so is m
		if (bpf_skb_load_bytes(skb, hdrs + at, buf, m))
			return 1;
		head += (__u32)bpf_csum_diff(0, 0, (__be32 *)buf, m, 0);
	}
	__u32 shead = fold(head);
	// the second segment's payload, kept here (zero-padded for its sum)
	__builtin_memset(buf, 0, CHUNK);
	if (bpf_skb_load_bytes(skb, hdrs + k, buf, SIZE(t, CHUNK)))
		return 1;
	__u32 stail = fold((__u32)bpf_csum_diff(0, 0, (__be32 *)buf, CHUNK, 0));
	// the sum of payload, addresses and protocol as the checksum has it
	// (what a full checksum vouches for; without one, a value the helper
	// ignores): the error of a wrong checksum, carried to both segments
	__u32 h0 = header_sum(tcp, thlen);
	__u32 sall = fold((__u64)neg(th->check) + neg(pseudo_len(thlen + n)) + neg(h0));
	__u32 check_at = l3 + offsetof(struct tcphdr, check);

	// the first segment, which leaves now
	if (bpf_skb_change_tail(skb, hdrs + k, 0))
		return 1; // untouched
	tcp[13] = flags & ~TCP_PSH;
	if (store_l3(skb, v6, &ip, thlen + k, 0) ||
	    bpf_skb_store_bytes(skb, l3 + 13, &tcp[13], 1, 0) ||
	    set_tcp_check(skb, check_at, thlen + n, thlen + k,
			  fold((__u64)pseudo_len(thlen + k) + header_sum(tcp, thlen) + sall +
			       neg(stail))))
		return -1;
	if (bpf_clone_redirect(skb, c->tun_ifindex, 0))
		return -1;

	// the skb becomes the second
	tcp[13] = flags & ~TCP_CWR;
	__u32 seq = bpf_htonl(bpf_ntohl(th->seq) + k);
	th->seq = seq;
	if (bpf_skb_store_bytes(skb, hdrs, buf, SIZE(t, CHUNK), 0) ||
	    bpf_skb_change_tail(skb, hdrs + t, 0) || store_l3(skb, v6, &ip, thlen + t, 1) ||
	    bpf_skb_store_bytes(skb, l3 + 4, &seq, 4, 0) ||
	    bpf_skb_store_bytes(skb, l3 + 13, &tcp[13], 1, 0) ||
	    set_tcp_check(skb, check_at, thlen + k, thlen + t,
			  fold((__u64)pseudo_len(thlen + t) + header_sum(tcp, thlen) + sall +
			       neg(shead))))
		return -1;
	return 0;
}

SEC("classifier")
int encap(struct __sk_buff *skb)
{
	struct config *c;
	struct stats *st;
	if (!settings(&c, &st))
		return PASS;
	void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
	__u32 peer = c->peer, hdrs;
	int v6 = 0;
	struct flow f = {};
	struct flow6 f6 = {};
	struct iphdr *in = plain_segment(data, end);
	if (!in) {
		struct ipv6hdr *in6 = plain_segment6(data, end);
		if (!in6)
			return PASS;
		v6 = 1;
		hdrs = headers6(in6, end);
		f6 = flow6_of(in6, end);
	} else {
		f = flow_of(in, end);
		hdrs = headers(in, end);
	}
	if (c->gateway) {
		void *guests = v6 ? (void *)&GUESTS6 : (void *)&GUESTS;
		void *to = v6 ? (void *)&f6.daddr : (void *)&f.daddr;
		void *from = v6 ? (void *)&f6.saddr : (void *)&f.saddr;
		struct guest *g = bpf_map_lookup_elem(guests, to);
		if (g && g->role == ROLE_OLD) {
			peer = g->peer; // old site: to the guest that moved
		} else {
			// new site: the guest's packets, back unless translated
			g = bpf_map_lookup_elem(guests, from);
			if (!g || g->role != ROLE_NEW ||
			    (v6 ? bpf_map_lookup_elem(&SLOW6, &f6) : bpf_map_lookup_elem(&SLOW, &f)))
				return PASS;
			peer = g->peer;
		}
	}
	__u32 len = skb->len;
	__u32 hlen = c->fou_port ? sizeof(struct outer) : sizeof(struct iphdr);
	if (len + hlen > 0xffff ||
	    (c->signal_pmtu && (skb->gso_size ? hdrs + skb->gso_size : len) > c->max_plain))
		return PASS; // userspace answers with ICMP
	if (!skb->gso_size && len > c->max_plain) {
		int r = split(skb, c, v6);
		if (r > 0)
			return PASS; // userspace fragments it
		if (r < 0) {
			st->errors++;
			return TC_ACT_SHOT;
		}
		st->split++;
		len = skb->len;
	}
	// a flow's segments keep one outer source port (one receive queue),
	// as Linux's FOU does
	__u32 hash = skb->hash ? skb->hash : bpf_get_hash_recalc(skb);
	__u16 sport = bpf_htons(49152 | (hash & 0x3fff));
	__u64 flags = BPF_F_ADJ_ROOM_ENCAP_L3_IPV4;
	if (c->fou_port)
		flags |= BPF_F_ADJ_ROOM_ENCAP_L4_UDP;
	if (bpf_skb_adjust_room(skb, hlen, BPF_ADJ_ROOM_MAC, flags))
		return PASS; // unchanged: the slow path takes it
	// room for a MAC header, which bpf_redirect_neigh fills in (the TUN
	// device has none)
	if (bpf_skb_change_head(skb, ETH_HLEN, 0)) {
		st->errors++;
		return TC_ACT_SHOT;
	}
	struct outer o = {};
	o.ip.version = 4;
	o.ip.ihl = 5;
	o.ip.ttl = 64;
	// DF clear, as the userspace plane sends (a smaller path fragments);
	// so no two packets in flight share an ID (the kernel counts up from
	// it across a super-packet's segments)
	o.ip.id = bpf_get_prandom_u32();
	o.ip.protocol = c->fou_port ? IPPROTO_UDP : v6 ? IPPROTO_IPV6 : IPPROTO_IPIP;
	o.ip.tot_len = bpf_htons(len + hlen);
	o.ip.saddr = c->local;
	o.ip.daddr = peer;
	o.ip.check = ip_checksum(&o.ip);
	o.udp.source = sport;
	o.udp.dest = c->fou_port;
	o.udp.len = bpf_htons(len + sizeof(struct udphdr));
	o.udp.check = 0; // IPv4: none (the inner packet has its own)
	__be16 proto = bpf_htons(ETH_P_IP);
	if (bpf_skb_store_bytes(skb, 12, &proto, sizeof(proto), 0) ||
	    bpf_skb_store_bytes(skb, ETH_HLEN, &o, hlen, 0)) {
		st->errors++;
		return TC_ACT_SHOT;
	}
	__u64 segs = segments(skb, len, hdrs); // gso_size now fits the path
	st->encap_packets += segs;
	st->encap_bytes += len;
	if (c->gateway)
		v6 ? note_in(&ACTIVITY6, &f6, segs, len) : note(&f, segs, len);
	return bpf_redirect_neigh(c->wan_ifindex, 0, 0, 0);
}

// Gateway mode: whether a packet out of the tunnel from `from` to `to`
// (addresses as `guests`, GUESTS or GUESTS6, keys them) is for a guest
// here (new site) or a moved guest's reply (old site).
static __always_inline int guests_packet(void *guests, void *to, void *from)
{
	struct guest *g = bpf_map_lookup_elem(guests, to);
	if (g && g->role == ROLE_NEW)
		return 1;
	g = bpf_map_lookup_elem(guests, from);
	return g && g->role == ROLE_OLD;
}

// decap's IPv6 inside.
static __always_inline int decap6(struct __sk_buff *skb, struct config *c, struct stats *st,
				  void *inner, void *end, __u32 hlen)
{
	struct ipv6hdr *in = plain_segment6(inner, end);
	if (!in)
		return PASS;
	__u32 inner_len = skb->len - ETH_HLEN - hlen;
	if (!skb->gso_size && bpf_ntohs(in->payload_len) + sizeof(*in) != inner_len)
		return PASS;
	struct flow6 f = flow6_of(in, end);
	if (c->gateway) {
		if (!guests_packet(&GUESTS6, &f.daddr, &f.saddr))
			return PASS; // userspace counts it as unregistered
	} else if (!c->deliver_any) {
		struct lpm_v6 key = {.prefixlen = 128};
		__builtin_memcpy(key.addr, &in->daddr, sizeof(key.addr));
		if (!bpf_map_lookup_elem(&DELIVER6, &key))
			return PASS;
	}
	__u64 segs = segments(skb, inner_len, headers6(in, end));
	if (bpf_skb_adjust_room(skb, -(__s32)hlen, BPF_ADJ_ROOM_MAC, DECAP_L3_IPV6))
		return PASS;
	st->decap_packets += segs;
	st->decap_bytes += inner_len;
	if (c->gateway)
		note_in(&ACTIVITY6, &f, segs, inner_len);
	return bpf_redirect(c->tun_ifindex, BPF_F_INGRESS);
}

SEC("classifier")
int decap(struct __sk_buff *skb)
{
	struct config *c;
	struct stats *st;
	if (!settings(&c, &st))
		return PASS;
	void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return PASS;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end)
		return PASS;
	if (ip->version != 4 || ip->ihl != 5 || (ip->frag_off & bpf_htons(0x3fff)) ||
	    ip->daddr != c->local)
		return PASS;
	void *inner = ip + 1;
	__u32 hlen = sizeof(struct iphdr);
	if (c->fou_port) {
		struct udphdr *udp = inner;
		if (ip->protocol != IPPROTO_UDP || (void *)(udp + 1) > end ||
		    udp->dest != c->fou_port)
			return PASS;
		inner = udp + 1;
		hlen = sizeof(struct outer);
	} else if (ip->protocol != IPPROTO_IPIP && ip->protocol != IPPROTO_IPV6) {
		return PASS;
	}
	__u32 src = ip->saddr;
	if (!bpf_map_lookup_elem(&PEERS, &src))
		return PASS; // the userspace plane counts the drop
	__u8 *version = inner;
	if ((void *)(version + 1) > end)
		return PASS;
	// the inner packet's version: FOU's first nibble, or the outer protocol
	if (c->fou_port ? *version >> 4 == 6 : ip->protocol == IPPROTO_IPV6)
		return decap6(skb, c, st, inner, end, hlen);
	struct iphdr *in = plain_segment(inner, end);
	if (!in)
		return PASS;
	// a whole inner packet, no more and no less (a GSO packet's headers
	// are its first segment's, with the total length)
	__u32 inner_len = skb->len - ETH_HLEN - hlen;
	if (!skb->gso_size && bpf_ntohs(in->tot_len) != inner_len)
		return PASS;
	__u64 segs = segments(skb, inner_len, headers(in, end));
	struct flow f = flow_of(in, end);
	if (c->gateway) {
		if (!guests_packet(&GUESTS, &f.daddr, &f.saddr))
			return PASS; // userspace counts it as unregistered
	} else if (!c->deliver_any) {
		struct lpm_v4 key = {.prefixlen = 32, .addr = in->daddr};
		if (!bpf_map_lookup_elem(&DELIVER, &key))
			return PASS;
	}
	if (bpf_skb_adjust_room(skb, -(__s32)hlen, BPF_ADJ_ROOM_MAC, 0))
		return PASS;
	st->decap_packets += segs;
	st->decap_bytes += inner_len;
	if (c->gateway)
		note(&f, segs, inner_len);
	return bpf_redirect(c->tun_ifindex, BPF_F_INGRESS);
}

char LICENSE[] SEC("license") = "Apache-2.0";
