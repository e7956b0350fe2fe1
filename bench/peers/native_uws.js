'use strict';
// uWebSockets.js as installed here (package.json maps it to @trufflesuite/uws-js-unofficial,
// whose loader silently falls back to a JavaScript implementation on top of `ws` when its
// native binary does not load). A measurement of that fallback would be a measurement of
// `ws` under uWS's name, so the peers that need uWS load it through here and stop instead.

function nativeUws() {
  delete process.env.UWS_USE_FALLBACK;
  const uWS = require('uWebSockets.js');
  const native = Object.keys(require.cache).find((path) => path.endsWith('.node')
    && path.includes('uWebSockets.js'));
  if (!native) {
    console.error('uWebSockets.js: the native binary did not load (see the warning above); '
      + 'refusing to run on its JavaScript fallback');
    process.exit(3);
  }
  return uWS;
}

module.exports = { nativeUws };
