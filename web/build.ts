// Bundles the browser code in web/ with esbuild (a registry package; nothing is downloaded at run time).
// The server calls buildDemo() in memory the first time the demo page is requested; this file can also
// be run to look at the output: `npm run build:web` writes web/dist/ (gitignored).
import fs from "node:fs/promises";
import path from "node:path";
import { fileURLToPath } from "node:url";
import * as esbuild from "esbuild";

export const webDir = path.dirname(fileURLToPath(import.meta.url));

export interface Asset {
  contentType: string;
  body: Buffer;
}

export type BundleEntry = string | { contents: string; resolveDir: string };

/** Bundles one browser entry point (TypeScript, a path or source text) into one ES module, with its source map. */
export async function bundle(entry: BundleEntry, name = "app.js"): Promise<{ js: string; map: string }> {
  const result = await esbuild.build({
    ...(typeof entry === "string"
      ? { entryPoints: [entry] }
      : { stdin: { contents: entry.contents, resolveDir: entry.resolveDir, loader: "ts", sourcefile: name.replace(/\.js$/, ".ts") } }),
    bundle: true,
    format: "esm",
    platform: "browser",
    target: "es2022",
    minify: true,
    sourcemap: "linked",
    legalComments: "none",
    outfile: path.join(webDir, "dist", name),
    write: false,
    logLevel: "silent",
  });
  const file = (suffix: string) => result.outputFiles.find((f) => f.path.endsWith(suffix))?.text ?? "";
  return { js: file(".js"), map: file(".js.map") };
}

/** The demo page's files by URL path: the page at /, its stylesheet and its bundled script. */
export async function buildDemo(): Promise<Map<string, Asset>> {
  const demoDir = path.join(webDir, "demo");
  const [html, css, script] = await Promise.all([
    fs.readFile(path.join(demoDir, "index.html")),
    fs.readFile(path.join(demoDir, "style.css")),
    bundle(path.join(demoDir, "app.ts")),
  ]);
  return new Map<string, Asset>([
    ["/", { contentType: "text/html; charset=utf-8", body: html }],
    ["/demo/style.css", { contentType: "text/css; charset=utf-8", body: css }],
    ["/demo/app.js", { contentType: "text/javascript; charset=utf-8", body: Buffer.from(script.js) }],
    ["/demo/app.js.map", { contentType: "application/json", body: Buffer.from(script.map) }],
  ]);
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const outDir = path.resolve(process.argv[2] ?? path.join(webDir, "dist"));
  for (const [urlPath, asset] of await buildDemo()) {
    const file = path.join(outDir, urlPath === "/" ? "index.html" : urlPath);
    await fs.mkdir(path.dirname(file), { recursive: true });
    await fs.writeFile(file, asset.body);
    console.log(`${path.relative(process.cwd(), file)}  ${asset.body.length} bytes`);
  }
}
