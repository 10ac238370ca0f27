/**
 * Floors under an idle Subscribe stream's memory, started by scenario (d) in Parley's place (same
 * environment, /readyz, the inspector) and measured the same way. Both use Parley's own HTTP servers
 * (createHttpServers: its one-port listener and limits), through HTTP/2's compatibility API, and
 * answer every Subscribe with one Ready notification, then hold the stream open:
 * - IDLE_FLOOR=http2 (default): writes headers and Ready itself, no RPC framework;
 * - IDLE_FLOOR=connect: a Connect router with only Subscribe, reached the way Parley reaches its own
 *   (universal request and response from Node's), no interceptors, no services, no bus.
 */
import type http from "node:http";
import type http2 from "node:http2";
import { create, toBinary } from "@bufbuild/protobuf";
import { createConnectRouter } from "@connectrpc/connect";
import { universalRequestFromNodeRequest, universalResponseToNodeResponse } from "@connectrpc/connect-node";
import { NotificationSchema, NotificationService } from "../gen/parley/v1/notification_pb.js";
import { createHttpServers } from "../src/transport/one-port.js";

const SUBSCRIBE_PATH = "/parley.v1.NotificationService/Subscribe";
const mode = process.env.IDLE_FLOOR ?? "http2";
if (mode !== "http2" && mode !== "connect") throw new Error(`IDLE_FLOOR must be http2 or connect, not ${mode}`);

const ready = create(NotificationSchema, { event: { case: "ready", value: {} } });
const readyBytes = toBinary(NotificationSchema, ready);
const readyEnvelope = new Uint8Array(5 + readyBytes.length);
new DataView(readyEnvelope.buffer).setUint32(1, readyBytes.length);
readyEnvelope.set(readyBytes, 5);

const router = createConnectRouter().service(NotificationService, {
  async *subscribe(_request, context) {
    yield ready;
    await new Promise((resolve) => context.signal.addEventListener("abort", resolve, { once: true }));
  },
});
const subscribe = router.handlers.find((handler) => handler.requestPath === SUBSCRIBE_PATH)!;

const handle = (req: http.IncomingMessage | http2.Http2ServerRequest, res: http.ServerResponse | http2.Http2ServerResponse) => {
  const path = req.url ?? "";
  if (path === SUBSCRIBE_PATH && req.httpVersion === "2.0") {
    if (mode === "connect") {
      subscribe(universalRequestFromNodeRequest(req, res, undefined, undefined))
        .then((response) => universalResponseToNodeResponse(response, res))
        .catch(() => {});
      return;
    }
    req.resume(); // the request body (one small message) is read and dropped
    res.writeHead(200, { "content-type": "application/grpc" });
    (res as http.ServerResponse).write(readyEnvelope);
    return;
  }
  res.writeHead(path === "/readyz" || path === "/metrics" ? 200 : 404, { "content-type": "text/plain" });
  res.end();
};

const { server } = createHttpServers(handle);
server.listen(Number(process.env.PARLEY_PORT), process.env.PARLEY_HOST ?? "127.0.0.1");

// Nothing to drain or flush: the streams carry no data.
process.on("SIGTERM", () => process.exit(0));
process.on("SIGINT", () => process.exit(0));
