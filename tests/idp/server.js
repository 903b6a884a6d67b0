// imapgate test identity provider (loopback only, in-memory, for integration tests).
//
// Built on npm `oidc-provider` (panva) 9.x. Keys are generated at start-up; nothing is read
// from or written to disk. Not for production use.
//
// ============================================================================================
// RECIPE FOR THE RUST TESTS
// ============================================================================================
// Start:   node tests/idp/server.js --port P          (P = 0 picks a free port)
//          optional: --jwks-max-age SECONDS   (Cache-Control max-age on the JWKS, default 300)
//                    --exit-with-stdin        (exit when stdin reaches EOF; spawn with a pipe)
// Ready:   exactly one stdout line `READY http://127.0.0.1:P` (P = the real port); nothing else
//          is ever written to stdout (library notices/warnings go to stderr). On Node 20 stderr
//          gets one line "oidc-provider WARNING: Unsupported runtime. Use Node.js v22.x LTS, ..."
//          (oidc-provider 9 officially targets Node 22+ LTS; it works on Node >= 20.18). Harmless.
// Stop:    SIGTERM or SIGINT -> exit code 0.
// Issuer:  `http://127.0.0.1:P` exactly (no trailing slash), same string in discovery `issuer`
//          and in every token's `iss`.
//
// Endpoints (all relative to the issuer):
//   GET  /.well-known/openid-configuration   discovery (also /.well-known/oauth-authorization-server)
//   GET  /jwks                               JWKS (RSA + EC P-256 keys, each with `kid`),
//                                            Content-Type application/jwk-set+json,
//                                            Cache-Control: public, max-age=<jwks-max-age>
//   POST /token                              token endpoint
//   POST /token/introspection                RFC 7662 introspection
//   POST /token/revocation                   RFC 7009 revocation (any authenticated client)
//   POST /device/auth                        RFC 8628 device authorization (discovery:
//                                            device_authorization_endpoint); see DEVICE FLOW below
//   POST /__device/approve                   test hook: approve a pending user code for an account
//   POST /__device/deny                      test hook: deny a pending user code
//   POST /__rotate                           test hook: new RSA + EC signing keys (new kids);
//                                            old keys stay published in the JWKS unless
//                                            `?drop_old=1` is given. 200 {"rs256":kid,"es256":kid,"kids":[...published]}
//   GET  /__health                           200 {"ok":true}
//   POST /__scripted/introspect              test hook: an RFC 7662 endpoint with answers the
//                                            test chooses (see SCRIPTED INTROSPECTION below)
//   POST /__scripted/answer                  test hook: JSON {"token":..,"answer":{..}}
//   GET  /__scripted/calls?token=T           test hook: {"calls":n} requests seen for T
//                                            (without token=: {"calls":n} for every token)
//   GET  /__gated/<name>/jwks                the same public JWKS as /jwks, unless held
//   POST /__gated/<name>/hold                test hook: from now on /__gated/<name>/jwks
//                                            requests hang until released (a slow IdP)
//   POST /__gated/<name>/release             test hook: answer every held request, stop holding
//   GET  /__gated/<name>/state               test hook: {"held":bool,"waiting":n,"served":n}
//
// Token request (client credentials grant, client_secret_basic):
//   POST /token   Authorization: Basic base64(<client_id>:secret-<client_id>)
//   Content-Type: application/x-www-form-urlencoded
//   grant_type=client_credentials&scope=imap&resource=urn:imapgate:rs256
//   curl -u alice:secret-alice -d grant_type=client_credentials -d scope=imap \
//        -d resource=urn:imapgate:rs256 http://127.0.0.1:P/token
//   -> 200 {"access_token":"...","expires_in":600,"token_type":"Bearer","scope":"imap"}
//
//   client_id (= test user)  secret          extra claims in the token / introspection
//   alice                    secret-alice    email=alice@example.org, preferred_username=alice, amr=["pwd","mfa"]
//   bob                      secret-bob      email=bob@example.org, amr=["pwd"]
//   mia                      secret-mia      email=mia@example.org, amr=["pwd","mfa"]
//   demo                     secret-demo     email=demo@example.org, amr=["pwd","mfa"]  (scripts/demo.sh)
//   eve                      secret-eve      email=eve@example.org, email_verified=false
//   sam                      secret-sam      email=sam@example.org, email_verified="true" (a string)
//   kelvin                   secret-kelvin   email="\u212Aate@example.org" (U+212A KELVIN SIGN, not k)
//   Every other user has email_verified=true (a boolean).
//   Allowed scopes: `imap`, `other` (space separated in `scope=`). Unknown scope values are
//   dropped silently (oidc-provider behaviour); without `scope=` the token has no scope claim.
//   `sub` = the client id (e.g. "alice"); `client_id` = the client id.
//
//   resource= (exactly one; RFC 8707)   format   alg     aud        lifetime
//   urn:imapgate:rs256 (the default)     JWT      RS256   imap       600 s
//   urn:imapgate:es256                   JWT      ES256   imap       600 s
//   urn:imapgate:other-aud               JWT      RS256   not-imap   600 s
//   urn:imapgate:short                   JWT      RS256   imap       2 s
//   urn:imapgate:opaque                  opaque   -       imap       600 s (introspect it)
//   anything else -> 400 {"error":"invalid_target",...}
//   JWT header: {"alg":"RS256"|"ES256","typ":"at+jwt","kid":"<kid in JWKS>"}
//   JWT payload: email, preferred_username (alice only), amr, jti, sub, iat, exp, scope,
//                client_id, iss, aud
//
// Client authentication: every client is registered as client_secret_basic, but oidc-provider
// treats client_secret_basic and client_secret_post as interchangeable, so a form body with
// client_id=..&client_secret=.. works too (at /token and /token/introspection). Use Basic.
//
// Introspection (RFC 7662), client `imapgate-gateway`, secret `secret-imapgate-gateway`:
//   POST /token/introspection   Authorization: Basic base64(imapgate-gateway:secret-imapgate-gateway)
//   token=<opaque token>[&token_type_hint=access_token]
//   curl -u imapgate-gateway:secret-imapgate-gateway -d token=TOKEN http://127.0.0.1:P/token/introspection
//   active -> {"active":true,"sub":"alice","email":"alice@example.org","preferred_username":"alice",
//              "amr":["pwd","mfa"],"client_id":"alice","exp":...,"iat":...,
//              "iss":"http://127.0.0.1:P","aud":"imap","scope":"imap","token_type":"Bearer"}
//              (no `jti`: for opaque tokens oidc-provider omits it because it equals the token)
//   unknown/expired/revoked token, or caller other than imapgate-gateway -> {"active":false}
//   wrong gateway secret -> 401 {"error":"invalid_client",...}
//   A JWT given to introspection -> 400 {"error":"unsupported_token_type",...} (oidc-provider
//   refuses to introspect structured tokens).
//
// DEVICE FLOW (RFC 8628, device authorization grant; as `imapgate oauth token` uses it):
//   Public client `imapgate-cli` (token_endpoint_auth_method none: send client_id, no secret),
//   grant types urn:ietf:params:oauth:grant-type:device_code and refresh_token, scopes
//   `imap other offline_access` (openid is not allowed: no ID tokens).
//   1. POST /device/auth   client_id=imapgate-cli&scope=imap[&resource=urn:imapgate:rs256]
//      curl -d client_id=imapgate-cli -d scope=imap -d resource=urn:imapgate:rs256 http://127.0.0.1:P/device/auth
//      -> 200 {"device_code":"...","user_code":"BCDF-GHJK","verification_uri":"http://127.0.0.1:P/device",
//              "verification_uri_complete":"...?user_code=BCDF-GHJK","expires_in":600}
//      (no `interval` field: RFC 8628 default 5 s applies; the IdP never answers slow_down)
//   2. POST /token   grant_type=urn:ietf:params:oauth:grant-type:device_code&device_code=...&client_id=imapgate-cli
//      curl -d client_id=imapgate-cli -d grant_type=urn:ietf:params:oauth:grant-type:device_code \
//           -d device_code=DC http://127.0.0.1:P/token
//      before approval -> 400 {"error":"authorization_pending",...}
//   3. POST /__device/approve   user_code=BCDF-GHJK&account=alice   (form, or JSON {"user_code":..,"account":..};
//      account = alice | bob | mia | demo; the user code is matched case-insensitively, dash optional)
//      curl -d user_code=BCDF-GHJK -d account=alice http://127.0.0.1:P/__device/approve
//      -> 200 {"ok":true,"user_code":"BCDF-GHJK","account":"alice","scope":"imap","resource":...}
//      POST /__device/deny   user_code=BCDF-GHJK -> 200 {"ok":true,"user_code":..,"denied":true};
//      the next token poll then gets 400 {"error":"access_denied",...}.
//      Hook errors: 400 missing user_code / unknown account, 404 unknown user code,
//      409 {"error":"already_used"} (approved/denied before), 410 expired, 405 not POST.
//   4. the same token request -> 200 {"access_token":"<JWT>","expires_in":600,"token_type":"Bearer","scope":"imap"}
//      (+ "refresh_token" when the device request had scope=imap offline_access; refresh with
//      grant_type=refresh_token&refresh_token=..&client_id=imapgate-cli; refresh tokens rotate).
//      Polling again after success -> 400 {"error":"invalid_grant",...} (the code is consumed).
//   JWT payload: sub=<account> (e.g. "alice"), email, preferred_username (alice only), amr,
//   client_id="imapgate-cli", scope, iss, aud, iat, exp, jti; header as above.
//   Resource: if step 1 names one, that is the only one the token request may ask for (another
//   -> 400 invalid_target; resource= at step 4 may repeat it or be left out). If step 1 names
//   none, every resource in the table above is granted and step 4 picks one with resource=
//   (none -> urn:imapgate:rs256). Scope: the requested imap/other values (none -> imap).
//   The codes live in the same in-memory store as tokens, so they survive POST /__rotate.
//
// SCRIPTED INTROSPECTION (answers a real IdP will not give: for the gateway's strictness tests)
//   POST /__scripted/answer   {"token":"t1","answer":{"active":true,"exp":...,"iss":...}}
//                             -> 200 {"ok":true}; the answer is returned as given, verbatim
//   POST /__scripted/introspect   Authorization: Basic base64(imapgate-gateway:secret-imapgate-gateway)
//                             token=t1 -> the scripted answer, or {"active":false} for an unknown
//                             token; wrong or missing client credentials -> 401 invalid_client.
//                             Every request with a token= is counted (GET /__scripted/calls).
// ============================================================================================

import * as crypto from 'node:crypto';
import * as http from 'node:http';
import { parseArgs } from 'node:util';

// ----------------------------------------------------------------------------------------------
// Command line
// ----------------------------------------------------------------------------------------------
let args;
try {
  ({ values: args } = parseArgs({
    options: {
      port: { type: 'string' },
      'jwks-max-age': { type: 'string', default: '300' },
      'exit-with-stdin': { type: 'boolean', default: false },
    },
    strict: true,
  }));
} catch (err) {
  process.stderr.write(`idp: ${err.message}\nusage: node server.js --port P [--jwks-max-age S] [--exit-with-stdin]\n`);
  process.exit(2);
}
const requestedPort = Number(args.port);
if (args.port === undefined || !Number.isInteger(requestedPort) || requestedPort < 0 || requestedPort > 65535) {
  process.stderr.write('idp: --port P is required (0..65535)\n');
  process.exit(2);
}
const jwksMaxAge = Number(args['jwks-max-age']);
if (!Number.isInteger(jwksMaxAge) || jwksMaxAge < 0) {
  process.stderr.write('idp: --jwks-max-age must be a non-negative integer\n');
  process.exit(2);
}

// oidc-provider prints notices with console.info (i.e. to stdout). stdout is reserved for the
// single READY line, so route every console method to stderr *before* loading the library
// (hence the dynamic import below instead of a static one).
for (const method of ['log', 'info', 'debug', 'trace']) {
  // eslint-disable-next-line no-console
  console[method] = console.error;
}
const { default: Provider, errors: oidcErrors } = await import('oidc-provider');

// ----------------------------------------------------------------------------------------------
// Test users = client-credentials clients
// ----------------------------------------------------------------------------------------------
const USERS = {
  alice: {
    email: 'alice@example.org', email_verified: true, preferred_username: 'alice', amr: ['pwd', 'mfa'],
  },
  bob: { email: 'bob@example.org', email_verified: true, amr: ['pwd'] },
  mia: { email: 'mia@example.org', email_verified: true, amr: ['pwd', 'mfa'] },
  // The mailbox of scripts/demo.sh (its one Dovecot user).
  demo: { email: 'demo@example.org', email_verified: true, amr: ['pwd', 'mfa'] },
  // An address the provider has not verified (anyone may type it at sign-up).
  eve: { email: 'eve@example.org', email_verified: false, amr: ['pwd', 'mfa'] },
  // A provider that says "true" (a string), not true.
  sam: { email: 'sam@example.org', email_verified: 'true', amr: ['pwd', 'mfa'] },
  // U+212A KELVIN SIGN: a full Unicode lower-casing makes this kate@example.org.
  kelvin: { email: '\u212Aate@example.org', email_verified: true, amr: ['pwd', 'mfa'] },
};
const GATEWAY_CLIENT = 'imapgate-gateway';
// Public client for the device authorization grant (RFC 8628), as `imapgate oauth token` uses it.
const CLI_CLIENT = 'imapgate-cli';
const DEVICE_CODE_GRANT = 'urn:ietf:params:oauth:grant-type:device_code';

const clients = [
  ...Object.keys(USERS).map((id) => ({
    client_id: id,
    client_secret: `secret-${id}`,
    token_endpoint_auth_method: 'client_secret_basic',
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    scope: 'imap other',
  })),
  {
    client_id: GATEWAY_CLIENT,
    client_secret: `secret-${GATEWAY_CLIENT}`,
    token_endpoint_auth_method: 'client_secret_basic',
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    scope: 'imap',
  },
  {
    client_id: CLI_CLIENT,
    token_endpoint_auth_method: 'none',
    grant_types: [DEVICE_CODE_GRANT, 'refresh_token'],
    response_types: [],
    redirect_uris: [],
    scope: 'imap other offline_access',
  },
];

// ----------------------------------------------------------------------------------------------
// Resource servers (RFC 8707 resource indicators) -> token format / alg / audience / lifetime
// ----------------------------------------------------------------------------------------------
const RESOURCE_SCOPE = 'imap other';
const DEFAULT_TTL = 600;
const RESOURCES = {
  'urn:imapgate:rs256': { format: 'jwt', alg: 'RS256', audience: 'imap', ttl: DEFAULT_TTL },
  'urn:imapgate:es256': { format: 'jwt', alg: 'ES256', audience: 'imap', ttl: DEFAULT_TTL },
  'urn:imapgate:other-aud': { format: 'jwt', alg: 'RS256', audience: 'not-imap', ttl: DEFAULT_TTL },
  'urn:imapgate:short': { format: 'jwt', alg: 'RS256', audience: 'imap', ttl: 2 },
  'urn:imapgate:opaque': { format: 'opaque', audience: 'imap', ttl: DEFAULT_TTL },
};
const DEFAULT_RESOURCE = 'urn:imapgate:rs256';

// ----------------------------------------------------------------------------------------------
// Keys (generated in memory; rotated by POST /__rotate)
// ----------------------------------------------------------------------------------------------
let generation = 0;
/** current signing kid per alg */
const current = { RS256: undefined, ES256: undefined };
/** every private JWK the provider knows (current + kept old ones), newest first */
let privateJwks = [];

function newKeys() {
  generation += 1;
  const suffix = crypto.randomBytes(4).toString('hex');
  const rsa = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({ format: 'jwk' });
  const ec = crypto.generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey.export({ format: 'jwk' });
  Object.assign(rsa, { kid: `rs256-g${generation}-${suffix}`, alg: 'RS256', use: 'sig' });
  Object.assign(ec, { kid: `es256-g${generation}-${suffix}`, alg: 'ES256', use: 'sig' });
  return { rsa, ec };
}

function installKeys({ dropOld }) {
  const { rsa, ec } = newKeys();
  privateJwks = [rsa, ec, ...(dropOld ? [] : privateJwks)];
  current.RS256 = rsa.kid;
  current.ES256 = ec.kid;
}

// ----------------------------------------------------------------------------------------------
// Storage shared across provider instances (a rotation builds a new Provider instance, and
// opaque tokens issued before it must stay introspectable).
// ----------------------------------------------------------------------------------------------
const store = new Map();
function sweep() {
  const now = Date.now();
  for (const [key, { expiresAt }] of store) {
    if (expiresAt !== undefined && expiresAt <= now) store.delete(key);
  }
}
class SharedMemoryAdapter {
  constructor(model) {
    this.model = model;
  }

  key(id) {
    return `${this.model}:${id}`;
  }

  async upsert(id, payload, expiresIn) {
    sweep();
    store.set(this.key(id), {
      payload,
      expiresAt: typeof expiresIn === 'number' ? Date.now() + (expiresIn + 15) * 1000 : undefined,
    });
  }

  async find(id) {
    const entry = store.get(this.key(id));
    if (!entry) return undefined;
    if (entry.expiresAt !== undefined && entry.expiresAt <= Date.now()) {
      store.delete(this.key(id));
      return undefined;
    }
    return entry.payload;
  }

  async findByUid(uid) {
    for (const [key, { payload }] of store) {
      if (key.startsWith(`${this.model}:`) && payload.uid === uid) return payload;
    }
    return undefined;
  }

  async findByUserCode(userCode) {
    for (const [key, { payload }] of store) {
      if (key.startsWith(`${this.model}:`) && payload.userCode === userCode) return payload;
    }
    return undefined;
  }

  async consume(id) {
    const entry = store.get(this.key(id));
    if (entry) entry.payload.consumed = Math.floor(Date.now() / 1000);
  }

  async destroy(id) {
    store.delete(this.key(id));
  }

  async revokeByGrantId(grantId) {
    for (const [key, { payload }] of store) {
      if (payload.grantId === grantId) store.delete(key);
    }
  }
}

// ----------------------------------------------------------------------------------------------
// Provider
// ----------------------------------------------------------------------------------------------
let issuer;

function buildProvider() {
  const provider = new Provider(issuer, {
    adapter: SharedMemoryAdapter,
    clients,
    jwks: { keys: privateJwks },
    scopes: ['openid', 'offline_access', 'imap', 'other'],
    claims: { openid: ['sub'] },
    // Accounts exist only for the device flow (approved through POST /__device/approve).
    findAccount: async (ctx, sub) => (Object.hasOwn(USERS, sub)
      ? { accountId: sub, claims: async () => ({ sub, ...structuredClone(USERS[sub]) }) }
      : undefined),
    features: {
      devInteractions: { enabled: false },
      userinfo: { enabled: false },
      clientCredentials: { enabled: true },
      // RFC 8628. No browser pages are used: tests approve with POST /__device/approve.
      deviceFlow: { enabled: true },
      introspection: {
        enabled: true,
        // Only the gateway client may introspect; everyone else gets {"active":false}.
        allowedPolicy: async (ctx, client) => client.clientId === GATEWAY_CLIENT,
      },
      revocation: {
        enabled: true,
        allowedPolicy: async () => true,
      },
      resourceIndicators: {
        enabled: true,
        // A device authorization request that names no resource is granted every resource, so
        // that its token request may pick one with resource= (default: DEFAULT_RESOURCE).
        defaultResource: async (ctx, client, oneOf) => (
          ctx?.oidc?.route === 'device_authorization' && oneOf === undefined
            ? Object.keys(RESOURCES)
            : DEFAULT_RESOURCE),
        useGrantedResource: async () => true,
        getResourceServerInfo: async (ctx, resourceIndicator) => {
          const rs = RESOURCES[resourceIndicator];
          if (!rs) {
            throw new oidcErrors.InvalidTarget(`unknown resource indicator ${resourceIndicator}`);
          }
          const info = {
            scope: RESOURCE_SCOPE,
            audience: rs.audience,
            accessTokenTTL: rs.ttl,
            accessTokenFormat: rs.format,
          };
          if (rs.format === 'jwt') {
            info.jwt = { sign: { alg: rs.alg, kid: current[rs.alg] } };
          }
          return info;
        },
      },
    },
    extraTokenClaims: async (ctx, token) => {
      // The user is the approving account (device flow) or else the client itself (client
      // credentials). `sub` here only matters for opaque client-credentials tokens
      // (introspection has no accountId to show); JWTs get sub = accountId or client id from
      // oidc-provider itself, so both formats agree.
      const user = token.accountId ?? token.clientId;
      return { sub: user, ...structuredClone(USERS[user] ?? {}) };
    },
    ttl: {
      ClientCredentials: (ctx, token) => token.resourceServer?.accessTokenTTL ?? DEFAULT_TTL,
      AccessToken: (ctx, token) => token.resourceServer?.accessTokenTTL ?? DEFAULT_TTL,
      AuthorizationCode: 60,
      IdToken: 3600,
      RefreshToken: 86400,
      DeviceCode: 600,
      Interaction: 3600,
      Session: 86400,
      Grant: 86400,
    },
    clientBasedCORS: () => false,
    renderError: async (ctx, out) => {
      ctx.type = 'application/json; charset=utf-8';
      ctx.body = out;
    },
  });

  provider.use(async (ctx, next) => {
    await next();
    if (ctx.oidc?.route === 'jwks' && ctx.status === 200) {
      ctx.set('Cache-Control', `public, max-age=${jwksMaxAge}`);
    }
  });

  // Unexpected server-side errors -> stderr (client errors such as invalid_client are normal in
  // negative tests and are not logged).
  provider.on('server_error', (ctx, err) => process.stderr.write(`idp: server_error: ${err?.stack ?? err}\n`));

  return provider;
}

let provider;
let handler;
function rebuild() {
  provider = buildProvider();
  handler = provider.callback();
}

// ----------------------------------------------------------------------------------------------
// Device flow test hooks: approve or deny a pending user code without a browser
// ----------------------------------------------------------------------------------------------
/** oidc-provider's own user-code normalisation (upper case, no separators). */
function normalizeUserCode(input) {
  return input.replace(/[a-z]/g, (c) => c.toUpperCase()).replace(/\W/g, '');
}

/** [status, body] for POST /__device/approve (approve = true) or /__device/deny. */
async function deviceDecision(approve, fields) {
  const userCode = typeof fields.user_code === 'string' ? fields.user_code : '';
  if (!userCode) return [400, { error: 'invalid_request', error_description: 'user_code is required' }];
  const account = typeof fields.account === 'string' ? fields.account : '';
  if (approve && !Object.hasOwn(USERS, account)) {
    return [400, {
      error: 'invalid_request',
      error_description: `account must be one of ${Object.keys(USERS).join(', ')}`,
    }];
  }

  const code = await provider.DeviceCode.findByUserCode(normalizeUserCode(userCode), { ignoreExpiration: true });
  if (!code) return [404, { error: 'not_found', error_description: 'no such user code' }];
  if (code.isExpired) return [410, { error: 'expired', error_description: 'the device code has expired' }];
  if (code.error || code.accountId || code.inFlight || code.consumed) {
    return [409, { error: 'already_used', error_description: 'the user code was already approved or denied' }];
  }

  if (!approve) {
    Object.assign(code, { error: 'access_denied', errorDescription: 'End-User aborted interaction' });
    await code.save();
    return [200, { ok: true, user_code: userCode, denied: true }];
  }

  // What the device authorization request asked for (already validated by oidc-provider).
  // Resource: the one it named; none named -> every known resource (see defaultResource), and
  // the token request picks one with resource= (default urn:imapgate:rs256). Scopes: the
  // requested resource scopes (none requested -> `imap`), plus offline_access if requested.
  const params = code.params ?? {};
  let resources;
  if (Array.isArray(params.resource)) {
    resources = params.resource;
  } else if (params.resource) {
    resources = [params.resource];
  } else {
    resources = Object.keys(RESOURCES);
  }
  const requested = String(params.scope ?? '').split(' ').filter(Boolean);
  const resourceScopes = requested.filter((s) => RESOURCE_SCOPE.split(' ').includes(s));
  if (resourceScopes.length === 0) resourceScopes.push('imap');
  const oidcScopes = requested.filter((s) => s === 'openid' || s === 'offline_access');

  const grant = new provider.Grant({ accountId: account, clientId: code.clientId });
  for (const resource of resources) grant.addResourceScope(resource, resourceScopes.join(' '));
  if (oidcScopes.length) grant.addOIDCScope(oidcScopes.join(' '));
  const grantId = await grant.save();

  Object.assign(code, {
    accountId: account,
    grantId,
    scope: [...oidcScopes, ...resourceScopes].join(' '),
    resource: resources.length === 1 ? resources[0] : resources,
    amr: USERS[account].amr,
    authTime: Math.floor(Date.now() / 1000),
  });
  await code.save();
  return [200, {
    ok: true, user_code: userCode, account, scope: code.scope, resource: code.resource,
  }];
}

/** Reads a small form or JSON body (plus query parameters) into a plain object. */
function readFields(req, url) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (chunk) => {
      size += chunk.length;
      if (size > 65536) {
        reject(new Error('body too large'));
        req.destroy();
        return;
      }
      chunks.push(chunk);
    });
    req.on('error', reject);
    req.on('end', () => {
      const fields = Object.fromEntries(url.searchParams);
      const body = Buffer.concat(chunks).toString('utf8');
      try {
        if (/json/i.test(req.headers['content-type'] ?? '') || body.trimStart().startsWith('{')) {
          if (body.trim()) Object.assign(fields, JSON.parse(body));
        } else {
          Object.assign(fields, Object.fromEntries(new URLSearchParams(body)));
        }
        resolve(fields);
      } catch (err) {
        reject(err);
      }
    });
  });
}

// ----------------------------------------------------------------------------------------------
// Scripted introspection and a JWKS endpoint that can be held (slow IdP)
// ----------------------------------------------------------------------------------------------
/** token -> the answer to give verbatim */
const scriptedAnswers = new Map();
/** token -> requests seen */
const scriptedCalls = new Map();

function gatewayClientAuthorized(req) {
  const want = `Basic ${Buffer.from(`${GATEWAY_CLIENT}:secret-${GATEWAY_CLIENT}`).toString('base64')}`;
  return req.headers.authorization === want;
}

/** The signing keys without their private parts, as /jwks publishes them. */
function publicJwks() {
  const PRIVATE = ['d', 'p', 'q', 'dp', 'dq', 'qi'];
  return {
    keys: privateJwks.map((k) => Object.fromEntries(Object.entries(k).filter(([f]) => !PRIVATE.includes(f)))),
  };
}

/** name -> { held, waiting: [res], served } */
const gates = new Map();
function gate(name) {
  if (!gates.has(name)) gates.set(name, { held: false, waiting: [], served: 0 });
  return gates.get(name);
}
function serveJwks(g, res) {
  g.served += 1;
  sendJson(res, 200, publicJwks(), { 'Content-Type': 'application/jwk-set+json', 'Cache-Control': `public, max-age=${jwksMaxAge}` });
}

async function scripted(req, res, url) {
  if (url.pathname === '/__scripted/calls' && req.method === 'GET') {
    const token = url.searchParams.get('token');
    const calls = token === null
      ? [...scriptedCalls.values()].reduce((a, b) => a + b, 0)
      : (scriptedCalls.get(token) ?? 0);
    sendJson(res, 200, { calls });
    return;
  }
  if (req.method !== 'POST') {
    sendJson(res, 405, { error: 'method_not_allowed' }, { Allow: 'POST' });
    return;
  }
  const fields = await readFields(req, url);
  if (url.pathname === '/__scripted/answer') {
    if (typeof fields.token !== 'string' || typeof fields.answer !== 'object') {
      sendJson(res, 400, { error: 'invalid_request', error_description: 'token and answer are required' });
      return;
    }
    scriptedAnswers.set(fields.token, fields.answer);
    sendJson(res, 200, { ok: true });
    return;
  }
  if (url.pathname === '/__scripted/introspect') {
    if (!gatewayClientAuthorized(req)) {
      sendJson(res, 401, { error: 'invalid_client' });
      return;
    }
    const token = typeof fields.token === 'string' ? fields.token : '';
    if (token) scriptedCalls.set(token, (scriptedCalls.get(token) ?? 0) + 1);
    sendJson(res, 200, scriptedAnswers.get(token) ?? { active: false });
    return;
  }
  sendJson(res, 404, { error: 'not_found' });
}

function gated(req, res, url) {
  const [, , name, action] = url.pathname.split('/');
  const g = gate(name);
  if (action === 'jwks' && req.method === 'GET') {
    if (!g.held) {
      serveJwks(g, res);
      return;
    }
    g.waiting.push(res);
    res.on('close', () => {
      g.waiting = g.waiting.filter((r) => r !== res);
    });
    return;
  }
  if (action === 'state' && req.method === 'GET') {
    sendJson(res, 200, { held: g.held, waiting: g.waiting.length, served: g.served });
    return;
  }
  if ((action === 'hold' || action === 'release') && req.method === 'POST') {
    req.resume();
    g.held = action === 'hold';
    if (!g.held) {
      const waiting = g.waiting;
      g.waiting = [];
      for (const r of waiting) if (!r.writableEnded) serveJwks(g, r);
    }
    sendJson(res, 200, { held: g.held });
    return;
  }
  sendJson(res, 404, { error: 'not_found' });
}

// ----------------------------------------------------------------------------------------------
// HTTP wrapper: test hooks + delegate to the current provider instance
// ----------------------------------------------------------------------------------------------
function sendJson(res, status, body, extraHeaders = {}) {
  const data = JSON.stringify(body);
  res.writeHead(status, {
    'Content-Type': 'application/json; charset=utf-8',
    'Content-Length': Buffer.byteLength(data),
    'Cache-Control': 'no-store',
    ...extraHeaders,
  });
  res.end(data);
}

const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://127.0.0.1');
  if (url.pathname === '/__rotate') {
    if (req.method !== 'POST') {
      sendJson(res, 405, { error: 'method_not_allowed' }, { Allow: 'POST' });
      return;
    }
    req.resume(); // ignore any body
    req.on('end', () => {
      try {
        const dropOld = ['1', 'true', 'yes'].includes(url.searchParams.get('drop_old') ?? '');
        installKeys({ dropOld });
        rebuild();
        sendJson(res, 200, {
          rs256: current.RS256,
          es256: current.ES256,
          kids: privateJwks.map((k) => k.kid),
        });
      } catch (err) {
        process.stderr.write(`idp: rotate failed: ${err?.stack ?? err}\n`);
        sendJson(res, 500, { error: 'rotate_failed' });
      }
    });
    return;
  }
  if (url.pathname === '/__device/approve' || url.pathname === '/__device/deny') {
    if (req.method !== 'POST') {
      sendJson(res, 405, { error: 'method_not_allowed' }, { Allow: 'POST' });
      return;
    }
    if (!provider) {
      sendJson(res, 503, { error: 'starting' });
      return;
    }
    readFields(req, url)
      .then((fields) => deviceDecision(url.pathname === '/__device/approve', fields))
      .then(([status, body]) => sendJson(res, status, body))
      .catch((err) => {
        process.stderr.write(`idp: ${url.pathname} failed: ${err?.stack ?? err}\n`);
        sendJson(res, 400, { error: 'invalid_request', error_description: String(err?.message ?? err) });
      });
    return;
  }
  if (url.pathname.startsWith('/__scripted/')) {
    scripted(req, res, url).catch((err) => {
      sendJson(res, 400, { error: 'invalid_request', error_description: String(err?.message ?? err) });
    });
    return;
  }
  if (url.pathname.startsWith('/__gated/')) {
    gated(req, res, url);
    return;
  }
  if (url.pathname === '/__health') {
    sendJson(res, 200, { ok: true });
    return;
  }
  if (!handler) {
    sendJson(res, 503, { error: 'starting' });
    return;
  }
  handler(req, res);
});

server.on('clientError', (err, socket) => {
  if (socket.writable) socket.end('HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n');
});

function shutdown() {
  server.close();
  server.closeAllConnections?.();
  process.exit(0);
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
if (args['exit-with-stdin']) {
  process.stdin.on('end', shutdown);
  process.stdin.on('error', shutdown);
  process.stdin.resume();
}

server.on('error', (err) => {
  process.stderr.write(`idp: listen failed: ${err.message}\n`);
  process.exit(1);
});

server.listen(requestedPort, '127.0.0.1', () => {
  const { port } = server.address();
  issuer = `http://127.0.0.1:${port}`;
  try {
    installKeys({ dropOld: false });
    rebuild();
  } catch (err) {
    process.stderr.write(`idp: provider setup failed: ${err?.stack ?? err}\n`);
    process.exit(1);
  }
  process.stdout.write(`READY ${issuer}\n`);
});
