import http2 from "node:http2";
import type http from "node:http";
import { createContextKey } from "@connectrpc/connect";
import type { CutOff } from "../services/event-queue.js";

/** How a Connect handler ends its own HTTP exchange (see cutOffResponse); set for server streams only. */
export const cutOffKey = createContextKey<CutOff | undefined>(undefined, { description: "cut off the response" });

/**
 * Ends a response below Connect, for a client that stopped reading: Connect waits for the client to
 * drain before it writes anything more, so an error sent in-band would never arrive. HTTP/2 resets
 * the stream with ENHANCE_YOUR_CALM, which gRPC and Connect clients report as RESOURCE_EXHAUSTED;
 * HTTP/1.1 has no per-request reset, so the connection is closed.
 */
export function cutOffResponse(res: http.ServerResponse | http2.Http2ServerResponse): CutOff {
  return () => {
    if (res.writableFinished) return;
    if (res instanceof http2.Http2ServerResponse) {
      if (!res.stream.destroyed) res.stream.close(http2.constants.NGHTTP2_ENHANCE_YOUR_CALM);
      // Connect's writer waits for "drain" or "error", and a reset stream emits neither: wake it, so it
      // finds the call aborted and ends the handler (which frees the stream's slot and listeners).
      res.emit("drain");
    } else {
      res.destroy();
    }
  };
}
