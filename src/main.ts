import { ConfigError, loadConfig } from "./config.js";
import { createLogger } from "./observability/logger.js";
import { startServer } from "./server.js";

let config;
try {
  config = loadConfig();
} catch (error) {
  if (!(error instanceof ConfigError)) throw error;
  console.error(`parley: configuration error: ${error.message}`);
  process.exit(2);
}
const log = createLogger(config.logLevel);
try {
  const server = await startServer(config, log);
  const stop = (signal: string) => {
    log.info({ signal }, "signal received");
    server.close().then(
      () => process.exit(0),
      (error) => {
        log.error({ err: error }, "shutdown failed");
        process.exit(1);
      },
    );
  };
  process.once("SIGTERM", () => stop("SIGTERM"));
  process.once("SIGINT", () => stop("SIGINT"));
} catch (error) {
  if (error instanceof ConfigError) {
    console.error(`parley: configuration error: ${error.message}`);
    process.exit(2);
  }
  log.fatal({ err: error }, "start-up failed");
  console.error(`parley: start-up failed: ${(error as Error).message}`);
  process.exit(1);
}
