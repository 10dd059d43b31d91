// The tunnel's kernel fast path (tc-BPF), built by tunnel/build.rs with
// clang and loaded by tunnel/src/fastpath.rs.
//
// encap, on the TUN device's egress: an IPv4 TCP segment routed into the
// tunnel (a 64 KiB GSO super-packet or a packet that fits) gets the outer
// IPv4 (+ UDP for FOU) header and leaves by the WAN interface, with no
// copy and no trip to userspace. The kernel cuts super-packets to fit
// the path as it would for its own tunnels (gso_size shrinks by the
// outer header).
//
// decap, on the WAN interface's ingress: an encapsulated IPv4 TCP segment
// from a configured peer, for an allowed inner destination, loses its
// outer header and enters the TUN device's ingress, as if the userspace
// data plane had written it there.
//
// Anything else takes the ordinary path (PASS) to the userspace data
// plane, which decides, counts and drops as before: SYN, FIN and RST
// segments (flow state, MSS clamping), other protocols, IPv6, IP options,
// fragments, link-local addresses, oversize packets, unknown peers,
// unregistered destinations, and anything malformed.

#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
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
};

struct lpm_v4 {
	__u32 prefixlen;
	__u32 addr;
};

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
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, struct guest);
} GUESTS SEC(".maps");

// Flows of guests here that leave translated (the userspace plane's NAT),
// keyed as the guest sends.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct flow);
	__type(value, __u32);
} SLOW SEC(".maps");

// Gateway mode: the flows carried, for the drain's bookkeeping (userspace
// reads and clears it every 250 ms).
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct flow);
	__type(value, struct activity);
} ACTIVITY SEC(".maps");

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

static __always_inline void note(struct flow *f, __u64 packets, __u64 bytes)
{
	struct activity *a = bpf_map_lookup_elem(&ACTIVITY, f);
	if (a) {
		__sync_fetch_and_add(&a->packets, packets);
		__sync_fetch_and_add(&a->bytes, bytes);
	} else {
		struct activity n = {.packets = packets, .bytes = bytes};
		bpf_map_update_elem(&ACTIVITY, f, &n, BPF_NOEXIST);
	}
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

SEC("classifier")
int encap(struct __sk_buff *skb)
{
	struct config *c;
	struct stats *st;
	if (!settings(&c, &st))
		return PASS;
	void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
	struct iphdr *in = plain_segment(data, end);
	if (!in)
		return PASS;
	__u32 peer = c->peer;
	struct flow f = flow_of(in, end);
	if (c->gateway) {
		struct guest *g = bpf_map_lookup_elem(&GUESTS, &f.daddr);
		if (g && g->role == ROLE_OLD) {
			peer = g->peer; // old site: to the guest that moved
		} else {
			// new site: the guest's packets, back unless translated
			g = bpf_map_lookup_elem(&GUESTS, &f.saddr);
			if (!g || g->role != ROLE_NEW || bpf_map_lookup_elem(&SLOW, &f))
				return PASS;
			peer = g->peer;
		}
	}
	__u32 len = skb->len;
	__u32 hdrs = headers(in, end);
	__u32 hlen = c->fou_port ? sizeof(struct outer) : sizeof(struct iphdr);
	if (len + hlen > 0xffff || (!skb->gso_size && len > c->max_plain) ||
	    (c->signal_pmtu && skb->gso_size && hdrs + skb->gso_size > c->max_plain))
		return PASS; // userspace fragments it or answers with ICMP
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
	o.ip.protocol = c->fou_port ? IPPROTO_UDP : IPPROTO_IPIP;
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
		note(&f, segs, len);
	return bpf_redirect_neigh(c->wan_ifindex, 0, 0, 0);
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
	} else if (ip->protocol != IPPROTO_IPIP) {
		return PASS;
	}
	__u32 src = ip->saddr;
	if (!bpf_map_lookup_elem(&PEERS, &src))
		return PASS; // the userspace plane counts the drop
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
		// new site: for a guest here; old site: a moved guest's replies
		struct guest *g = bpf_map_lookup_elem(&GUESTS, &f.daddr);
		if (!g || g->role != ROLE_NEW) {
			g = bpf_map_lookup_elem(&GUESTS, &f.saddr);
			if (!g || g->role != ROLE_OLD)
				return PASS; // userspace counts it as unregistered
		}
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
