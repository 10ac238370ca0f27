/**
 * The floor under an idle Subscribe stream's memory: Node's HTTP/2 server, behind the same one-port
 * listener and with the same settings as Parley, reached through the compatibility API that Connect
 * needs. It answers every Subscribe with response headers and one Ready notification and then holds
 * the stream open: no RPC framework, no service, no bus. Scenario (d) starts it in Parley's place
 * (same environment, /readyz, the inspector) and measures it the same way.
 */
import http from "node:http";
import http2 from "node:http2";
import { create, toBinary } from "@bufbuild/protobuf";
import { NotificationSchema } from "../gen/parley/v1/notification_pb.js";
import { createOnePortServer } from "../src/transport/one-port.js";

const SUBSCRIBE_PATH = "/parley.v1.NotificationService/Subscribe";
const MAX_HEADER_BYTES = 256 * 1024;

const readyBytes = toBinary(NotificationSchema, create(NotificationSchema, { event: { case: "ready", value: {} } }));
const readyEnvelope = new Uint8Array(5 + readyBytes.length);
new DataView(readyEnvelope.buffer).setUint32(1, readyBytes.length);
readyEnvelope.set(readyBytes, 5);

const handle = (req: http.IncomingMessage | http2.Http2ServerRequest, res: http.ServerResponse | http2.Http2ServerResponse) => {
  const path = req.url ?? "";
  if (path === SUBSCRIBE_PATH && req.httpVersion === "2.0") {
    req.resume(); // the request body (one small message) is read and dropped
    res.writeHead(200, { "content-type": "application/grpc" });
    (res as http.ServerResponse).write(readyEnvelope);
    return;
  }
  res.writeHead(path === "/readyz" || path === "/metrics" ? 200 : 404, { "content-type": "text/plain" });
  res.end();
};

const http1 = http.createServer({ keepAliveTimeout: 65_000, maxHeaderSize: MAX_HEADER_BYTES }, handle);
const h2c = http2.createServer({ maxSessionMemory: 64, settings: { maxHeaderListSize: MAX_HEADER_BYTES } }, handle);
const server = createOnePortServer(http1, h2c);
server.listen(Number(process.env.PARLEY_PORT), process.env.PARLEY_HOST ?? "127.0.0.1");

// Nothing to drain or flush: the streams carry no data.
process.on("SIGTERM", () => process.exit(0));
process.on("SIGINT", () => process.exit(0));
