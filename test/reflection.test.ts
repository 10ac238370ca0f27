// Checks reflection and health with grpc-js, an independent gRPC implementation.
import http2 from "node:http2";
import type { AddressInfo } from "node:net";
import { fileURLToPath } from "node:url";
import { createFileRegistry, fromBinary } from "@bufbuild/protobuf";
import { FileDescriptorProtoSchema } from "@bufbuild/protobuf/wkt";
import { connectNodeAdapter } from "@connectrpc/connect-node";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { Health } from "../gen/grpc/health/v1/health_pb.js";
import * as v1 from "../gen/grpc/reflection/v1/reflection_pb.js";
import * as v1alpha from "../gen/grpc/reflection/v1alpha/reflection_pb.js";
import { ChatService } from "../gen/parley/v1/chat_pb.js";
import { MemberService } from "../gen/parley/v1/member_pb.js";
import { MessageService } from "../gen/parley/v1/message_pb.js";
import { NotificationService } from "../gen/parley/v1/notification_pb.js";
import { registerHealth } from "../src/grpc/health.js";
import { registerReflection } from "../src/grpc/reflection.js";

const services = [
  ChatService,
  MemberService,
  MessageService,
  NotificationService,
  Health,
  v1.ServerReflection,
  v1alpha.ServerReflection,
];
let serving = true;
const shutdown = new AbortController();
const server = http2.createServer(
  connectNodeAdapter({
    routes(router) {
      registerReflection(router, services);
      registerHealth(router, {
        isServing: async () => serving,
        serviceNames: services.map((s) => s.typeName),
        signal: shutdown.signal,
        watchIntervalMs: 10,
      });
    },
  }),
);
await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
const client = new grpc.Client(`127.0.0.1:${(server.address() as AddressInfo).port}`, grpc.credentials.createInsecure());

// grpc-js only knows the reflection and health protocols from their .proto files.
const definitions = await protoLoader.load(
  ["grpc/reflection/v1/reflection.proto", "grpc/reflection/v1alpha/reflection.proto", "grpc/health/v1/health.proto"],
  { includeDirs: [fileURLToPath(new URL("../proto", import.meta.url))], keepCase: true, enums: String, oneofs: true, arrays: true },
);
const method = (service: string, name: string) =>
  (definitions[service] as grpc.ServiceDefinition)[name]!;

interface ReflectionResponse {
  message_response: string;
  list_services_response?: { service: { name: string }[] };
  file_descriptor_response?: { file_descriptor_proto: Uint8Array[] };
  all_extension_numbers_response?: { base_type_name: string; extension_number: number[] };
  error_response?: { error_code: number; error_message: string };
}

// Sends all requests on one stream, as grpcurl does, and collects the answers.
async function reflect(version: "v1" | "v1alpha", ...requests: object[]): Promise<ReflectionResponse[]> {
  const m = method(`grpc.reflection.${version}.ServerReflection`, "ServerReflectionInfo");
  const call = client.makeBidiStreamRequest(m.path, m.requestSerialize, m.responseDeserialize);
  requests.forEach((r) => call.write(r));
  call.end();
  return (await call.toArray()) as ReflectionResponse[];
}

function filesOf(response: ReflectionResponse | undefined) {
  assert.is(response?.message_response, "file_descriptor_response", JSON.stringify(response?.error_response));
  return response!.file_descriptor_response!.file_descriptor_proto.map((b) => fromBinary(FileDescriptorProtoSchema, b));
}

function check(service: string): Promise<{ status: string }> {
  const m = method("grpc.health.v1.Health", "Check");
  return new Promise((resolve, reject) =>
    client.makeUnaryRequest(m.path, m.requestSerialize, m.responseDeserialize, { service }, (error, response) =>
      error ? reject(error) : resolve(response as { status: string }),
    ),
  );
}

function watch(service: string) {
  const m = method("grpc.health.v1.Health", "Watch");
  const call = client.makeServerStreamRequest(m.path, m.requestSerialize, m.responseDeserialize, { service });
  const responses = call[Symbol.asyncIterator]() as AsyncIterator<{ status: string }>;
  return { call, next: async () => (await responses.next()).value?.status };
}

test.after(async () => {
  shutdown.abort(); // ends Watch streams a failed test left open, which would keep the server up
  client.close();
  await new Promise((resolve) => server.close(resolve));
});

for (const version of ["v1", "v1alpha"] as const) {
  test(`${version}: list_services names every registered service`, async () => {
    const [response] = await reflect(version, { list_services: "*" });
    const names = response!.list_services_response!.service.map((s) => s.name);
    assert.equal(names, services.map((s) => s.typeName));
  });

  test(`${version}: file_containing_symbol returns the file with its imports`, async () => {
    const files = filesOf((await reflect(version, { file_containing_symbol: "parley.v1.MessageService" }))[0]);
    assert.equal(files.map((f) => f.name), ["parley/v1/message.proto", "google/protobuf/timestamp.proto"]);
    const service = files[0]!.service.find((s) => s.name === "MessageService")!;
    assert.equal(service.method.map((m) => m.name), ["SendMessage", "ListMessages", "GetMessage", "WatchMessages"]);
    assert.is(service.method[3]!.serverStreaming, true);
    // Clients such as grpcurl build descriptors from the response alone, JSON names and imports included.
    assert.is(files[0]!.messageType.find((m) => m.name === "Message")!.field[1]!.jsonName, "chatId");
    const registry = createFileRegistry(files[0]!, (name) => files.find((f) => f.name === name));
    assert.is(registry.getService("parley.v1.MessageService")?.methods.length, 4);
  });
}

test("file_containing_symbol resolves methods, nested types and enum values; unknown is NOT_FOUND", async () => {
  const symbols = [
    "parley.v1.MessageService.SendMessage",
    "parley.v1.Message",
    "parley.v1.ORDER_NEWEST_FIRST",
    "grpc.health.v1.HealthCheckResponse.ServingStatus",
    "grpc.health.v1.HealthCheckResponse.SERVING",
    "google.protobuf.Timestamp",
  ];
  const responses = await reflect("v1", ...symbols.map((s) => ({ file_containing_symbol: s })), {
    file_containing_symbol: "parley.v1.Nope",
  });
  const names = responses.slice(0, -1).map((r) => filesOf(r)[0]!.name);
  assert.equal(names, [
    "parley/v1/message.proto",
    "parley/v1/message.proto",
    "parley/v1/message.proto",
    "grpc/health/v1/health.proto",
    "grpc/health/v1/health.proto",
    "google/protobuf/timestamp.proto",
  ]);
  assert.is(responses.at(-1)!.error_response?.error_code, 5);
});

test("file_by_filename sends transitive imports; unknown file is NOT_FOUND", async () => {
  const [found, missing] = await reflect(
    "v1alpha",
    { file_by_filename: "parley/v1/notification.proto" },
    { file_by_filename: "parley/v1/nope.proto" },
  );
  const names = filesOf(found).map((f) => f.name);
  assert.equal(names.sort(), ["google/protobuf/timestamp.proto", "parley/v1/message.proto", "parley/v1/notification.proto"]);
  assert.is(missing!.error_response?.error_code, 5);
});

test("extension queries: none for known types, NOT_FOUND otherwise", async () => {
  const [numbers, unknownType, extension] = await reflect(
    "v1",
    { all_extension_numbers_of_type: "parley.v1.Message" },
    { all_extension_numbers_of_type: "parley.v1.Nope" },
    { file_containing_extension: { containing_type: "parley.v1.Message", extension_number: 100 } },
  );
  assert.equal(numbers!.all_extension_numbers_response, { base_type_name: "parley.v1.Message", extension_number: [] });
  assert.is(unknownType!.error_response?.error_code, 5);
  assert.is(extension!.error_response?.error_code, 5);
});

test("health Check follows isServing; unknown service is NOT_FOUND", async () => {
  assert.is((await check("")).status, "SERVING");
  assert.is((await check("parley.v1.ChatService")).status, "SERVING");
  serving = false;
  assert.is((await check("")).status, "NOT_SERVING");
  serving = true;
  const error = (await check("parley.v1.Nope").catch((e: unknown) => e)) as grpc.ServiceError;
  assert.is(error.code, grpc.status.NOT_FOUND);
});

test("health Watch reports changes, SERVICE_UNKNOWN for unknown names, and ends on shutdown", async () => {
  const overall = watch("");
  assert.is(await overall.next(), "SERVING");
  serving = false;
  assert.is(await overall.next(), "NOT_SERVING");
  serving = true;
  assert.is(await overall.next(), "SERVING");

  const unknown = watch("parley.v1.Nope");
  assert.is(await unknown.next(), "SERVICE_UNKNOWN");
  unknown.call.cancel();

  shutdown.abort();
  assert.is(await overall.next(), undefined);
});

test.run();
