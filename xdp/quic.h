/* QUIC connection-id parsing (docs/datapath.md, real selection step 0): the server id a
 * real embedded in the destination connection id, in Katran's CID layouts. Pure parsing:
 * the server-id table is looked up in balancer.c.
 *
 * Constants (QUIC_*) come from lb/constants.py through xdp/generated/lb_shared.h.
 */
#pragma once

#include <linux/types.h>

#include "generated/lb_shared.h"

/* The server id in a DCID of at least 5 readable bytes (v3 reads dcid[0..4]); 0 for CID
 * version 0. The top 2 bits of dcid[0] are the CID version. */
static __always_inline __u32 quic_cid_server_id(const __u8 *dcid)
{
	__u8 version = dcid[0] >> 6;

	if (version == QUIC_CID_V1) /* 16 bits after the version bits */
		return ((__u32)(dcid[0] & 0x3f) << 10) | ((__u32)dcid[1] << 2) | (dcid[2] >> 6);
	if (version == QUIC_CID_V2) /* 24 bits: dcid[1..3] */
		return ((__u32)dcid[1] << 16) | ((__u32)dcid[2] << 8) | dcid[3];
	if (version == QUIC_CID_V3) /* 32 bits: dcid[1..4] */
		return ((__u32)dcid[1] << 24) | ((__u32)dcid[2] << 16) | ((__u32)dcid[3] << 8) | dcid[4];
	return 0;
}

/* The server id of the UDP payload at `payload`, of `payload_len` bytes inside the packet
 * (what is after it in the frame is not read). 0: no id to route on (fallback) — too
 * short, Initial / 0-RTT, DCID shorter than QUIC_MIN_CONNID_LEN, CID version 0, id 0. */
static __always_inline __u32 quic_server_id(const __u8 *payload, void *data_end, __u32 payload_len)
{
	if (payload_len < 1 || (void *)(payload + 1) > data_end)
		return 0;
	if (payload[0] & QUIC_LONG_HEADER) {
		/* flags, version(4), DCID length, then the DCID */
		if (payload_len < QUIC_LONG_CID_OFFSET + QUIC_MIN_CONNID_LEN ||
		    (void *)(payload + QUIC_LONG_CID_OFFSET + QUIC_MIN_CONNID_LEN) > data_end)
			return 0;
		/* Initial and 0-RTT carry a DCID the client chose */
		if ((payload[0] & QUIC_PACKET_TYPE_MASK) < QUIC_HANDSHAKE)
			return 0;
		if (payload[QUIC_LONG_CID_OFFSET - 1] < QUIC_MIN_CONNID_LEN)
			return 0;
		return quic_cid_server_id(payload + QUIC_LONG_CID_OFFSET);
	}
	if (payload_len < QUIC_SHORT_CID_OFFSET + QUIC_MIN_CONNID_LEN ||
	    (void *)(payload + QUIC_SHORT_CID_OFFSET + QUIC_MIN_CONNID_LEN) > data_end)
		return 0;
	return quic_cid_server_id(payload + QUIC_SHORT_CID_OFFSET);
}
