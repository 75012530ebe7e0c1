// Generate with an edgeformer bundle whose search runs in one graph (`edgeformer export ... --search beam`), from
// Node.js with onnxruntime-node alone: no Python, no edgeformer. One JSON line per input, as
// `edgeformer generate --json` gives its best hypothesis.
//
//   ONNXRUNTIME_NODE_INSTALL=skip npm install          # the CPU binaries; the default install downloads CUDA's
//   node translate.mjs BUNDLE [--beams N] [--max-new-tokens N] [--ids] INPUT ...
//
// INPUT is text for a bundle with a character tokenizer (the shipped model's), else token ids ("5 6 7" with --ids).
// The manifest (edgeformer.json) says everything: the model's special tokens, the generation defaults, the search
// graph's inputs. A runtime that takes model bytes rather than a path (a browser, a phone) must also be handed the
// external weight files the graph names (`encoder.weights`, `decoder.weights`, `shared.weights`), through
// SessionOptions.externalData in onnxruntime-web; onnxruntime-node reads them beside the graph itself.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import * as ort from "onnxruntime-node";

const SPECIALS = 4; // <pad> <s> </s> <unk>: a character tokenizer's ids start after them
const UNK = 3;
const END = -1; // where the graph's sequences stop (their pad_token_id)

function parse(argv) {
  const opts = { beams: null, maxNewTokens: null, ids: false, inputs: [] };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--beams") opts.beams = Number(argv[++i]);
    else if (a === "--max-new-tokens") opts.maxNewTokens = Number(argv[++i]);
    else if (a === "--ids") opts.ids = true;
    else opts.inputs.push(a);
  }
  if (opts.inputs.length < 2) {
    throw new Error("usage: node translate.mjs BUNDLE [--beams N] [--max-new-tokens N] [--ids] INPUT ...");
  }
  opts.bundle = opts.inputs.shift();
  return opts;
}

function charTokenizer(tokenizer, eos) {
  if (!tokenizer || tokenizer.kind !== "char") return null;
  const index = new Map([...tokenizer.source].map((c, i) => [c, i + SPECIALS]));
  return {
    encode: (text) => [...[...text].map((c) => index.get(c) ?? UNK), eos],
    decode: (ids) => ids.map((i) => (i >= SPECIALS && i - SPECIALS < tokenizer.target.length
      ? tokenizer.target[i - SPECIALS] : "\uFFFD")).join(""),
  };
}

async function main() {
  const opts = parse(process.argv.slice(2));
  const manifest = JSON.parse(readFileSync(join(opts.bundle, "edgeformer.json"), "utf8"));
  if (!manifest.search) throw new Error(`${opts.bundle} has no one-graph search: export it with --search beam`);
  const { config, generation = {} } = manifest;
  const tokenizer = charTokenizer(manifest.tokenizer
    ? JSON.parse(readFileSync(join(opts.bundle, manifest.tokenizer), "utf8")) : null, config.eos_id);
  if (!opts.ids && !tokenizer) throw new Error("this bundle's tokenizer is not a character one: pass --ids");
  const sources = opts.inputs.map((s) => (opts.ids ? s.trim().split(/\s+/).map(Number) : tokenizer.encode(s)));

  // Right-padded int32 inputs and their mask, as the runtime pads them.
  const width = Math.max(...sources.map((s) => s.length));
  const ids = new Int32Array(sources.length * width).fill(config.pad_id);
  const mask = new Int32Array(sources.length * width);
  sources.forEach((s, b) => s.forEach((t, j) => { ids[b * width + j] = t; mask[b * width + j] = 1; }));

  const beams = opts.beams ?? (generation.strategy === "beam" ? generation.num_beams ?? 4 : 1);
  const maxNew = opts.maxNewTokens ?? generation.max_new_tokens ?? 64;
  const vocabMask = new Int32Array(config.tgt_vocab_size).fill(1);
  for (const t of generation.suppress_tokens ?? []) vocabMask[t] = 0;
  const int32 = (v) => new ort.Tensor("int32", Int32Array.from([v]), [1]);
  const feeds = {
    input_ids: new ort.Tensor("int32", ids, [sources.length, width]),
    attention_mask: new ort.Tensor("int32", mask, [sources.length, width]),
    max_length: int32(maxNew + 1), // the decoder start token and the new tokens
    min_length: int32((generation.min_new_tokens ?? 0) + 1),
    num_beams: int32(beams),
    num_return_sequences: int32(1),
    length_penalty: new ort.Tensor("float32", Float32Array.from([beams > 1 ? generation.length_penalty ?? 1 : 0]),
      [1]),
    vocab_mask: new ort.Tensor("int32", vocabMask, [config.tgt_vocab_size]),
  };
  const names = manifest.graphs.search.inputs.map((t) => t.name); // a greedy graph takes no beam settings
  const session = await ort.InferenceSession.create(join(opts.bundle, manifest.graphs.search.file),
    { intraOpNumThreads: 2 });
  const out = await session.run(Object.fromEntries(names.map((n) => [n, feeds[n]])));
  const [batch, returned, length] = out.sequences.dims;
  for (let b = 0; b < batch; b++) {
    const row = Array.from(out.sequences.data.slice(b * returned * length + 1, b * returned * length + length));
    const tokens = row.filter((t) => t !== END);
    const line = { tokens, score: out.sequences_scores.data[b * returned] };
    if (tokenizer) line.output = tokenizer.decode(tokens);
    console.log(JSON.stringify(line));
  }
}

main().catch((e) => { console.error(`error: ${e.message}`); process.exit(1); });
