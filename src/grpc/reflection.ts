import { toBinary } from "@bufbuild/protobuf";
import type { DescFile, DescService } from "@bufbuild/protobuf";
import { nestedTypes } from "@bufbuild/protobuf/reflect";
import { FileDescriptorProtoSchema } from "@bufbuild/protobuf/wkt";
import { Code } from "@connectrpc/connect";
import type { ConnectRouter } from "@connectrpc/connect";
import * as v1 from "../../gen/grpc/reflection/v1/reflection_pb.js";
import * as v1alpha from "../../gen/grpc/reflection/v1alpha/reflection_pb.js";

type Request = v1.ServerReflectionRequest | v1alpha.ServerReflectionRequest;

// A plain init object, without $typeName, so that it fits both v1 and v1alpha responses.
type Answer =
  | { case: "fileDescriptorResponse"; value: { fileDescriptorProto: Uint8Array[] } }
  | { case: "allExtensionNumbersResponse"; value: { baseTypeName: string; extensionNumber: number[] } }
  | { case: "listServicesResponse"; value: { service: { name: string }[] } }
  | { case: "errorResponse"; value: { errorCode: number; errorMessage: string } };

interface Index {
  services: string[];
  files: Map<string, DescFile>;
  // Fully-qualified symbol name to the file defining it.
  symbols: Map<string, DescFile>;
  // Message type name to the extensions extending it, keyed by field number.
  extensions: Map<string, Map<number, DescFile>>;
  encoded: Map<DescFile, Uint8Array>;
}

/**
 * Serves gRPC server reflection (v1, and v1alpha that many clients still use)
 * for the given services and the files they need.
 */
export function registerReflection(router: ConnectRouter, services: DescService[]): void {
  const index = buildIndex(services);
  // The two versions are identical on the wire; only the package differs.
  router.service(v1.ServerReflection, { serverReflectionInfo: (requests) => respond(index, requests) });
  router.service(v1alpha.ServerReflection, { serverReflectionInfo: (requests) => respond(index, requests) });
}

async function* respond<R extends Request>(index: Index, requests: AsyncIterable<R>) {
  for await (const request of requests) {
    yield { validHost: request.host, originalRequest: request, messageResponse: answer(index, request) };
  }
}

function answer(index: Index, { messageRequest: req }: Request): Answer {
  switch (req.case) {
    case "listServices":
      return { case: "listServicesResponse", value: { service: index.services.map((name) => ({ name })) } };
    case "fileByFilename":
      return withDependencies(index, index.files.get(req.value), `file ${req.value}`);
    case "fileContainingSymbol":
      return withDependencies(index, index.symbols.get(req.value), `symbol ${req.value}`);
    case "fileContainingExtension": {
      const { containingType, extensionNumber } = req.value;
      const file = index.extensions.get(containingType)?.get(extensionNumber);
      return withDependencies(index, file, `extension ${extensionNumber} of ${containingType}`);
    }
    case "allExtensionNumbersOfType": {
      const byNumber = index.extensions.get(req.value);
      if (!byNumber) return notFound(`type ${req.value}`);
      const extensionNumber = [...byNumber.keys()];
      return { case: "allExtensionNumbersResponse", value: { baseTypeName: req.value, extensionNumber } };
    }
    case undefined:
      return { case: "errorResponse", value: { errorCode: Code.InvalidArgument, errorMessage: "empty message_request" } };
  }
}

// Clients build descriptors from the response alone, so every import must travel with the file.
function withDependencies(index: Index, file: DescFile | undefined, what: string): Answer {
  if (!file) return notFound(what);
  const closure = new Set<DescFile>();
  const visit = (f: DescFile): void => {
    if (closure.has(f)) return;
    closure.add(f);
    f.dependencies.forEach(visit);
  };
  visit(file);
  const fileDescriptorProto = [...closure].map((f) => index.encoded.get(f)!);
  return { case: "fileDescriptorResponse", value: { fileDescriptorProto } };
}

function notFound(what: string): Answer {
  return { case: "errorResponse", value: { errorCode: Code.NotFound, errorMessage: `${what} not found` } };
}

function buildIndex(services: DescService[]): Index {
  const index: Index = {
    services: services.map((s) => s.typeName),
    files: new Map(),
    symbols: new Map(),
    extensions: new Map(),
    encoded: new Map(),
  };
  // Every message gets an entry, so that "no extensions" differs from "unknown type".
  const extensionsOf = (typeName: string): Map<number, DescFile> =>
    index.extensions.get(typeName) ?? index.extensions.set(typeName, new Map()).get(typeName)!;
  const add = (file: DescFile): void => {
    if (index.files.has(file.proto.name)) return;
    index.files.set(file.proto.name, file);
    // protobuf-es restores json_name and dependency on load; only source info (comments) is absent.
    index.encoded.set(file, toBinary(FileDescriptorProtoSchema, file.proto));
    for (const type of nestedTypes(file)) {
      index.symbols.set(type.typeName, file);
      switch (type.kind) {
        case "service":
          type.methods.forEach((m) => index.symbols.set(`${type.typeName}.${m.name}`, file));
          break;
        case "message":
          extensionsOf(type.typeName);
          type.fields.forEach((f) => index.symbols.set(`${type.typeName}.${f.name}`, file));
          break;
        case "enum": {
          // Enum values are scoped as siblings of their enum (C++ scoping rules).
          const scope = type.typeName.slice(0, -type.name.length);
          type.values.forEach((v) => index.symbols.set(scope + v.name, file));
          break;
        }
        case "extension":
          extensionsOf(type.extendee.typeName).set(type.number, file);
          break;
      }
    }
    file.dependencies.forEach(add);
  };
  services.forEach((s) => add(s.file));
  return index;
}
