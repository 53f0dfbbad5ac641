// Build script for the Skyvisor web console.
//   node build.mjs [--outdir DIR] [--watch]
// Output: DIR/index.html, DIR/assets/app.js + app.css (first load),
// DIR/assets/xterm.css and DIR/assets/chunks/*.js (loaded on demand).
// Deterministic: no timestamps, content-hashed chunk names only.
import * as esbuild from 'esbuild';
import { mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, relative, resolve, sep } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const args = process.argv.slice(2);
let outdir = 'dist';
let watch = false;
for (let i = 0; i < args.length; i++) {
  const a = args[i];
  if (a === '--outdir') outdir = args[++i];
  else if (a.startsWith('--outdir=')) outdir = a.slice('--outdir='.length);
  else if (a === '--watch') watch = true;
  else { console.error(`unknown argument ${a}`); process.exit(2); }
}
if (!outdir) { console.error('--outdir needs a directory'); process.exit(2); }
outdir = resolve(process.cwd(), outdir);

const page = (preloads) => `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<title>Skyvisor</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="./assets/app.css">
<script type="module" src="./assets/app.js"></script>
${preloads.map((f) => `<link rel="modulepreload" href="./${f}">\n`).join('')}</head>
<body>
<noscript>The Skyvisor console needs JavaScript.</noscript>
<div id="app"></div>
</body>
</html>
`;

const options = {
  absWorkingDir: here,
  entryPoints: {
    'assets/app': 'src/main.jsx',
    'assets/xterm': 'src/xterm.css',
  },
  outdir,
  bundle: true,
  splitting: true,
  format: 'esm',
  target: ['es2020', 'chrome90', 'firefox90', 'safari14'],
  minify: !watch,
  sourcemap: false,
  legalComments: 'eof',
  jsx: 'automatic',
  jsxImportSource: 'preact',
  entryNames: '[dir]/[name]',
  chunkNames: 'assets/chunks/[name]-[hash]',
  assetNames: 'assets/[name]-[hash]',
  define: { 'process.env.NODE_ENV': '"production"' },
  loader: { '.woff': 'file', '.woff2': 'file', '.svg': 'file' },
  charset: 'utf8',
  logLevel: 'warning',
  metafile: true,
};

rmSync(outdir, { recursive: true, force: true });
mkdirSync(outdir, { recursive: true });

if (watch) {
  writeFileSync(resolve(outdir, 'index.html'), page([]));
  const ctx = await esbuild.context(options);
  await ctx.watch();
  console.log(`watching; writing to ${outdir}`);
} else {
  const result = await esbuild.build(options);
  // Preload the chunks the entry imports statically (not the lazy ones).
  const rel = (f) => relative(outdir, resolve(here, f)).split(sep).join('/');
  const entry = Object.entries(result.metafile.outputs).find(([f]) => rel(f) === 'assets/app.js');
  const preloads = entry ? entry[1].imports.filter((i) => i.kind === 'import-statement').map((i) => rel(i.path)).sort() : [];
  writeFileSync(resolve(outdir, 'index.html'), page(preloads));
  const files = Object.entries(result.metafile.outputs)
    .map(([f, o]) => `${rel(f)}  ${o.bytes} B`)
    .sort();
  console.log(files.join('\n'));
}
