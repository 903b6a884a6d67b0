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
//                    --client ID:SECRET:REDIRECT_URI   (repeatable) registers a web client for
//                                             the sign-in flow before READY, exactly as POST
//                                             /__clients does (see SIGN-IN FLOW below); a bad
//                                             one -> a line on stderr and exit 2
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
//   GET  /auth                               authorization endpoint (SIGN-IN FLOW below)
//   GET  /interaction/<uid>                  the IdP's login form (HTML)
//   POST /interaction/<uid>/login            username + password from that form
//   POST /interaction/<uid>/abort            its Cancel button (RP gets error=access_denied)
//   GET  /session/end                        end_session_endpoint (RP-initiated logout)
//   POST /__clients                          test hook: register (or replace) a web client
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
// SIGN-IN FLOW (OpenID Connect authorization code flow with PKCE, as the portal uses it)
//   1. Register the relying party once its port is known (one IdP per test binary, so any
//      number of clients; the same client_id again replaces the client, secret included):
//      POST /__clients   Content-Type: application/json
//        {"client_id":"portal-1","client_secret":"s3cret",
//         "redirect_uris":["https://127.0.0.1:PORT/auth/callback"],
//         "post_logout_redirect_uris":["https://127.0.0.1:PORT/"]}     (optional; default: the
//                                                 origin of each redirect URI + "/")
//      curl -H 'Content-Type: application/json' -d '{"client_id":...}' http://127.0.0.1:P/__clients
//      -> 200 {"ok":true,"client_id":..,"redirect_uris":[..],"post_logout_redirect_uris":[..]}
//         (the secret is never echoed); 400 {"error":"invalid_client_metadata",..} for a bad
//         id/secret/URI (client_id: 1-128 of A-Z a-z 0-9 . _ ~ -); 409 for a built-in client id
//         (alice, imapgate-gateway, ...); 405 not POST.
//      The client: confidential web client, response_types [code], grant_types
//      [authorization_code, refresh_token], token_endpoint_auth_method client_secret_basic
//      (client_secret_post works too, as for every client here), ID tokens RS256 (kid in
//      /jwks), require_auth_time, scopes `openid email profile groups offline_access`.
//      http:// redirect URIs on 127.0.0.1 work as well as https:// ones.
//   2. Browser -> GET /auth?response_type=code&client_id=..&redirect_uri=..&scope=openid email
//        profile groups&state=..&nonce=..&code_challenge=<S256>&code_challenge_method=S256
//        [&max_age=N][&prompt=login][&login_hint=alice]
//      PKCE is required (without code_challenge: redirect with error=invalid_request; S256 is
//      the only method). Without a (fresh enough) IdP session -> 303 to /interaction/<uid>, the
//      login form: <form id="login-form"> with <label for="username">User name</label>
//      input#username, <label for="password">Password</label> input#password,
//      button#submit "Sign in"; a second form with button#cancel "Cancel"; an error is
//      p#error role="alert". User name = the account (alice) or its address (alice@example.org).
//      Wrong password -> 200, the same form again with "Wrong user name or password." (never a
//      redirect, never a 500). Expired/unknown interaction (or no cookies) -> 400 HTML page.
//      Right password -> 303 chain -> redirect_uri?code=..&state=..&iss=http://127.0.0.1:P
//      (no consent page: what the client asked for is granted at once, by an extra 303 through
//      /interaction/<uid2>). Cancel -> redirect_uri?error=access_denied&state=..&iss=..
//      With a live IdP session (cookie `_session`, 1 day) the next /auth comes straight back
//      with a code (no form), unless max_age=N and the last sign-in is older than N s
//      (max_age=0: always) or prompt=login: then the form again. Signing in as another person
//      in the same browser works (oidc-provider ends the old IdP session on the way: an
//      auto-submitting page, JavaScript on).
//      Note: cookies ignore ports, so the IdP's `_session`/`_interaction*` cookies for
//      127.0.0.1 also reach a portal on 127.0.0.1 (and the portal's __Host- cookies, Secure,
//      never reach the plain-http IdP).
//   3. POST /token   Authorization: Basic base64(client_id:client_secret)
//        grant_type=authorization_code&code=..&redirect_uri=..&code_verifier=..
//      -> 200 {"access_token":"<opaque>","expires_in":600,"id_token":"<JWT>","scope":"openid ..",
//              "token_type":"Bearer"} (+ refresh_token only when the request had both
//              scope offline_access and prompt=consent: oidc-provider's reading of OIDC Core
//              11; prompt=consent shows no page here either).
//      Codes live 60 s and work once (a second use -> 400 invalid_grant).
//   ID token: header {"alg":"RS256","kid":..}; payload iss (= issuer), aud (= client_id), sub
//   (= the account), exp (iat + 3600), iat, auth_time (when the person typed the password),
//   nonce (as sent), sid (the IdP session), amr, plus per scope: email -> email,
//   email_verified (true, a boolean); profile -> name, preferred_username (= account);
//   groups -> groups (a list, maybe empty). No acr. There is no userinfo endpoint.
//
//   account    password      email                     amr            groups
//   alice      pw-alice      alice@example.org         ["pwd","mfa"]  []
//   bob        pw-bob        bob@example.org           ["pwd"]        []
//   hanna      pw-hanna      hanna@example.org         ["pwd","mfa"]  ["mail-admins"]  (helpdesk)
//   demo       pw-demo       demo@example.org          ["pwd","mfa"]  []   (scripts/demo.sh)
//   newbie     pw-newbie     newbie@example.org        ["pwd","mfa"]  []   (no user record yet)
//   stranger   pw-stranger   stranger@elsewhere.test   ["pwd","mfa"]  []   (unrouted domain)
//   (These are people of the login form; the client-credentials users above are separate, and
//   alice/bob/demo's access-token claims there are unchanged.)
//
//   Sign-out: GET /session/end?id_token_hint=..&post_logout_redirect_uri=..&state=.. shows
//   "Sign out of the test IdP?" with button#logout-yes / button#logout-no; yes -> 303 to the
//   post_logout_redirect_uri (must be registered) or a "Signed out" page.
//   tests/browser/idp_selfcheck.py plays all of this in Chromium (see tests/browser/lib.py
//   idp_sign_in for filling the form).
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
      // id:secret:redirect_uri, repeatable: a web client for the sign-in flow (the demo's portal)
      client: { type: 'string', multiple: true, default: [] },
    },
    strict: true,
  }));
} catch (err) {
  process.stderr.write(`idp: ${err.message}\nusage: node server.js --port P [--jwks-max-age S] [--exit-with-stdin] [--client ID:SECRET:REDIRECT_URI]...\n`);
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

// --client ID:SECRET:REDIRECT_URI (the redirect URI has colons of its own: split at the first two).
const cliClients = [];
for (const spec of args.client) {
  const first = spec.indexOf(':');
  const second = first < 0 ? -1 : spec.indexOf(':', first + 1);
  if (first <= 0 || second <= first + 1 || second === spec.length - 1) {
    process.stderr.write('idp: --client must be ID:SECRET:REDIRECT_URI (e.g. portal:s3cret:https://127.0.0.1:8443/auth/callback)\n');
    process.exit(2);
  }
  cliClients.push({
    client_id: spec.slice(0, first),
    client_secret: spec.slice(first + 1, second),
    redirect_uris: [spec.slice(second + 1)],
  });
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

// Static client ids: /__clients may not register one of these (the static one would win).
const STATIC_CLIENT_IDS = new Set(clients.map((c) => c.client_id));

// ----------------------------------------------------------------------------------------------
// People who sign in through the IdP's own login form (authorization code flow, as the portal
// uses it). Password: `pw-<account>`. Every person: email_verified=true, amr ["pwd","mfa"]
// unless given, name, preferred_username = the account, groups.
// ----------------------------------------------------------------------------------------------
const PEOPLE = {
  alice: { email: 'alice@example.org', groups: [] },
  // Signs in with a password only (amr ["pwd"]): a portal with `require_amr: [mfa]` refuses him.
  bob: { email: 'bob@example.org', groups: [], amr: ['pwd'] },
  // The helpdesk.
  hanna: { email: 'hanna@example.org', groups: ['mail-admins'] },
  // The mailbox of scripts/demo.sh.
  demo: { email: 'demo@example.org', groups: [] },
  // Someone with no user record at the gateway yet (auto-provisioning).
  newbie: { email: 'newbie@example.org', groups: [] },
  // A mail domain the gateway does not route.
  stranger: { email: 'stranger@elsewhere.test', groups: [] },
};
const DEFAULT_AMR = ['pwd', 'mfa'];

/** The claims of a person (the provider filters them by the granted scopes). */
function personClaims(account) {
  const p = PEOPLE[account];
  return {
    sub: account,
    email: p.email,
    email_verified: true,
    name: account.charAt(0).toUpperCase() + account.slice(1),
    preferred_username: account,
    groups: [...p.groups],
  };
}

/** The account for what someone typed as user name (the account or its address), or undefined. */
function personFor(username) {
  const typed = String(username ?? '').trim().toLowerCase();
  return Object.keys(PEOPLE).find((a) => a === typed || PEOPLE[a].email === typed);
}

/** Constant-time password check (`pw-<account>`). */
function passwordMatches(account, password) {
  const want = crypto.createHash('sha256').update(`pw-${account}`).digest();
  const got = crypto.createHash('sha256').update(String(password ?? '')).digest();
  return crypto.timingSafeEqual(want, got);
}

// Web clients registered at run time (POST /__clients, --client): client id -> metadata. They
// live in the shared store (model `Client`), so oidc-provider finds them as it finds clients
// from dynamic registration, and they survive POST /__rotate.
const registeredClients = new Set();
const WEB_CLIENT_SCOPE = 'openid offline_access email profile groups';

/** Builds a client's metadata from the hook's fields; throws Error(description) if malformed. */
function webClientMetadata(fields) {
  const { client_id: id, client_secret: secret } = fields;
  if (typeof id !== 'string' || !/^[A-Za-z0-9._~-]{1,128}$/.test(id)) {
    throw new Error('client_id must be 1-128 characters of A-Z a-z 0-9 . _ ~ -');
  }
  if (typeof secret !== 'string' || secret.length === 0 || secret.length > 512) {
    throw new Error('client_secret must be a non-empty string');
  }
  const uris = (name, required) => {
    const v = fields[name];
    if (v === undefined && !required) return undefined;
    if (!Array.isArray(v) || (required && v.length === 0) || !v.every((u) => typeof u === 'string')) {
      throw new Error(`${name} must be ${required ? 'a non-empty' : 'an'} array of strings`);
    }
    return v;
  };
  const redirectUris = uris('redirect_uris', true);
  // Default: each redirect URI's origin + "/" (where the portal shows "signed out").
  // (An invalid redirect URI gives no default here; Client.validate reports it.)
  const postLogout = uris('post_logout_redirect_uris', false)
    ?? [...new Set(redirectUris.filter((u) => URL.canParse(u)).map((u) => `${new URL(u).origin}/`))];
  return {
    client_id: id,
    client_secret: secret,
    application_type: 'web',
    redirect_uris: redirectUris,
    post_logout_redirect_uris: postLogout,
    response_types: ['code'],
    grant_types: ['authorization_code', 'refresh_token'],
    token_endpoint_auth_method: 'client_secret_basic',
    id_token_signed_response_alg: 'RS256',
    require_auth_time: true,
    scope: WEB_CLIENT_SCOPE,
  };
}

/** [status, body] for POST /__clients: registers (or replaces) a web client. */
async function registerClient(fields) {
  let metadata;
  try {
    metadata = webClientMetadata(fields);
  } catch (err) {
    return [400, { error: 'invalid_client_metadata', error_description: err.message }];
  }
  if (STATIC_CLIENT_IDS.has(metadata.client_id)) {
    return [409, { error: 'client_id_taken', error_description: `${metadata.client_id} is a built-in client` }];
  }
  try {
    await provider.Client.validate(metadata);
  } catch (err) {
    return [400, {
      error: 'invalid_client_metadata',
      error_description: String(err?.error_description ?? err?.message ?? err),
    }];
  }
  await new SharedMemoryAdapter('Client').upsert(metadata.client_id, metadata);
  registeredClients.add(metadata.client_id);
  return [200, {
    ok: true,
    client_id: metadata.client_id,
    redirect_uris: metadata.redirect_uris,
    post_logout_redirect_uris: metadata.post_logout_redirect_uris,
  }];
}

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

  // Called per token model (oidc-provider's MemoryAdapter also drops only tokens): an
  // Interaction or Session that mentions the grant must survive, or an account switch on the
  // login form (sign-out of the old session, then resume) finds its interaction gone.
  async revokeByGrantId(grantId) {
    for (const [key, { payload }] of store) {
      if (key.startsWith(`${this.model}:`) && payload.grantId === grantId) store.delete(key);
    }
  }
}

// ----------------------------------------------------------------------------------------------
// Provider
// ----------------------------------------------------------------------------------------------
let issuer;
const COOKIE_KEY = crypto.randomBytes(32).toString('base64url');

function buildProvider() {
  const provider = new Provider(issuer, {
    adapter: SharedMemoryAdapter,
    clients,
    jwks: { keys: privateJwks },
    scopes: ['openid', 'offline_access', 'imap', 'other', 'email', 'profile', 'groups'],
    claims: {
      // amr: the session's (how the person signed in, from the login form); an ID token claim.
      openid: ['sub', 'amr'],
      email: ['email', 'email_verified'],
      profile: ['name', 'preferred_username'],
      groups: ['groups'],
    },
    // People of the login form (PEOPLE) and the device flow's accounts (USERS, approved through
    // POST /__device/approve). Device-flow tokens take their claims from extraTokenClaims below,
    // so a name in both (alice, bob, demo) keeps its access-token claims.
    findAccount: async (ctx, sub) => {
      if (Object.hasOwn(PEOPLE, sub)) return { accountId: sub, claims: async () => personClaims(sub) };
      if (Object.hasOwn(USERS, sub)) {
        return { accountId: sub, claims: async () => ({ sub, ...structuredClone(USERS[sub]) }) };
      }
      return undefined;
    },
    // The login form lives in this file (see interaction() below), not in oidc-provider.
    interactions: { url: async (ctx, interaction) => `/interaction/${interaction.uid}` },
    // Cookie signing keys outlive a provider rebuild (POST /__rotate), so a sign-in that is
    // under way, and the IdP session, survive a key rotation.
    cookies: { keys: [COOKIE_KEY] },
    // Every authorization request must carry PKCE (S256 is the only method oidc-provider 9
    // accepts): a relying party that forgets it gets invalid_request.
    pkce: { required: () => true },
    // ID tokens carry the scope's claims (email, groups, ...) even though an access token is
    // issued too: the portal reads them from the ID token (there is no userinfo endpoint).
    conformIdTokenClaims: false,
    features: {
      devInteractions: { enabled: false },
      userinfo: { enabled: false },
      // GET/POST /session/end (discovery: end_session_endpoint), with our own pages.
      rpInitiatedLogout: { enabled: true, logoutSource, postLogoutSuccessSource },
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
        // Web clients (sign-in flow) get no resource: their access token is an opaque one
        // for the (disabled) userinfo endpoint, and nothing but the ID token matters.
        defaultResource: async (ctx, client, oneOf) => {
          if (ctx?.oidc?.route === 'device_authorization' && oneOf === undefined) return Object.keys(RESOURCES);
          if (client && registeredClients.has(client.clientId)) return undefined;
          return DEFAULT_RESOURCE;
        },
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

  // ID tokens for web clients carry `sid` (the IdP session, for RP-initiated logout).
  // oidc-provider adds it only for clients with a back-channel logout URI; a test IdP has no
  // business calling the portal back, so widen the rule for the registered web clients.
  const { includeSid } = provider.Client.prototype;
  provider.Client.prototype.includeSid = function includeSidForWebClients() {
    return registeredClients.has(this.clientId) || includeSid.call(this);
  };

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
// The IdP's own pages: login form (interaction), sign-out confirmation. Plain HTML, no script,
// no third-party assets; labelled fields, one <main>, an <h1>, errors with role="alert", colours
// with WCAG AA contrast (axe-core finds nothing serious on them).
// ----------------------------------------------------------------------------------------------
const PAGE_CSP = "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'";
const PAGE_STYLE = `
  body { font: 16px/1.5 system-ui, sans-serif; color: #1b1b1b; background: #f4f4f4; margin: 0; }
  main { max-width: 26rem; margin: 3rem auto; padding: 1.5rem 2rem; background: #fff;
         border: 1px solid #8a8a8a; border-radius: 6px; }
  h1 { font-size: 1.5rem; margin: 0 0 .5rem; }
  label { display: block; font-weight: 600; margin-top: 1rem; }
  input { box-sizing: border-box; width: 100%; font: inherit; padding: .4rem; margin-top: .25rem;
          border: 1px solid #595959; border-radius: 4px; }
  button { font: inherit; padding: .5rem 1rem; margin-top: 1.25rem; border-radius: 4px;
           border: 1px solid #0b3d73; background: #0b3d73; color: #fff; cursor: pointer; }
  button.secondary { background: #fff; color: #0b3d73; }
  :focus-visible { outline: 3px solid #b35900; outline-offset: 2px; }
  #error { color: #8b0000; background: #fdecea; border: 1px solid #8b0000; padding: .5rem; }
  .hint { color: #4a4a4a; font-size: .9rem; }
  code { white-space: nowrap; }
`;

function htmlEscape(value) {
  return String(value ?? '').replace(/[&<>"']/g, (c) => ({
    '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;',
  })[c]);
}

/** A whole HTML page (title and body are HTML; escape what goes in). */
function pageHtml(title, body) {
  return `<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>${title} · imapgate test IdP</title>
<style>${PAGE_STYLE}</style>
</head>
<body>
<main id="main">
${body}
</main>
</body>
</html>
`;
}

function sendPage(res, status, title, body) {
  const data = pageHtml(title, body);
  res.writeHead(status, {
    'Content-Type': 'text/html; charset=utf-8',
    'Content-Length': Buffer.byteLength(data),
    'Cache-Control': 'no-store',
    'Content-Security-Policy': PAGE_CSP,
    'X-Content-Type-Options': 'nosniff',
    'Referrer-Policy': 'no-referrer',
  });
  res.end(data);
}

/** The login form of interaction `uid` (error: a message to show above it). */
function loginPage(res, { uid, clientId, username, error }) {
  const action = `/interaction/${encodeURIComponent(uid)}`;
  const errorBlock = error ? `<p id="error" role="alert">${htmlEscape(error)}</p>\n` : '';
  sendPage(res, 200, 'Sign in', `<h1>Sign in</h1>
<p>to continue to <strong id="client">${htmlEscape(clientId)}</strong></p>
${errorBlock}<form id="login-form" method="post" action="${action}/login">
<label for="username">User name</label>
<input id="username" name="username" type="text" autocomplete="username" autocapitalize="none"
  spellcheck="false" required value="${htmlEscape(username)}"${username ? '' : ' autofocus'}>
<label for="password">Password</label>
<input id="password" name="password" type="password" autocomplete="current-password" required${username ? ' autofocus' : ''}>
<button id="submit" type="submit">Sign in</button>
</form>
<form id="abort-form" method="post" action="${action}/abort">
<button id="cancel" class="secondary" type="submit">Cancel</button>
</form>
<p class="hint">Test identity provider: user name <code>alice</code>, password <code>pw-alice</code>.</p>`);
}

function expiredPage(res) {
  sendPage(res, 400, 'Sign-in expired', `<h1>This sign-in has expired</h1>
<p id="error" role="alert">The sign-in request is unknown or has expired (or cookies are blocked).
Go back to the application and start again.</p>`);
}

/** rpInitiatedLogout.logoutSource: "sign out?" with the provider's hidden form. */
async function logoutSource(ctx, form) {
  ctx.set('Content-Security-Policy', PAGE_CSP);
  ctx.body = pageHtml('Sign out', `<h1>Sign out of the test IdP?</h1>
${form}
<button id="logout-yes" type="submit" form="op.logoutForm" value="yes" name="logout">Yes, sign me out</button>
<button id="logout-no" class="secondary" type="submit" form="op.logoutForm">No, stay signed in</button>`);
}

/** rpInitiatedLogout.postLogoutSuccessSource (no post_logout_redirect_uri given). */
async function postLogoutSuccessSource(ctx) {
  ctx.set('Content-Security-Policy', PAGE_CSP);
  ctx.body = pageHtml('Signed out', '<h1>Signed out</h1>\n<p id="notice" role="status">You are signed out of the test IdP.</p>');
}

const INTERACTION_PATH = /^\/interaction\/([A-Za-z0-9_-]{1,64})(?:\/(login|abort))?$/;

/**
 * GET  /interaction/<uid>        the login form (prompt login); a consent prompt is granted at
 *                                once (no consent page) and the browser sent on
 * POST /interaction/<uid>/login  username + password -> back to the authorization endpoint,
 *                                or the form again with an error
 * POST /interaction/<uid>/abort  the relying party gets error=access_denied
 */
async function interaction(req, res, url, uid, action) {
  let details;
  try {
    details = await provider.interactionDetails(req, res);
  } catch (err) {
    if (err instanceof oidcErrors.SessionNotFound) {
      req.resume();
      expiredPage(res);
      return;
    }
    throw err;
  }
  if (details.uid !== uid) {
    req.resume();
    expiredPage(res);
    return;
  }
  const { prompt, params } = details;
  const want = action === undefined ? ['GET', 'HEAD'] : ['POST'];
  if (!want.includes(req.method)) {
    req.resume();
    sendJson(res, 405, { error: 'method_not_allowed' }, { Allow: want.join(', ') });
    return;
  }

  if (action === undefined && prompt.name === 'consent') {
    // No consent page: grant what the client asked for.
    let grant = details.grantId ? await provider.Grant.find(details.grantId) : undefined;
    const existing = Boolean(grant);
    grant ??= new provider.Grant({ accountId: details.session.accountId, clientId: params.client_id });
    const missing = prompt.details;
    if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
    if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
    for (const [indicator, scopes] of Object.entries(missing.missingResourceScopes ?? {})) {
      grant.addResourceScope(indicator, scopes.join(' '));
    }
    const grantId = await grant.save();
    await provider.interactionFinished(req, res, { consent: existing ? {} : { grantId } }, { mergeWithLastSubmission: true });
    return;
  }
  if (prompt.name !== 'login') {
    req.resume();
    sendPage(res, 400, 'Unsupported', `<h1>Unsupported request</h1>
<p id="error" role="alert">The test IdP cannot handle the prompt "${htmlEscape(prompt.name)}".</p>`);
    return;
  }
  if (action === undefined) {
    const hint = typeof params.login_hint === 'string' ? params.login_hint : '';
    loginPage(res, { uid, clientId: params.client_id, username: hint });
    return;
  }
  const fields = await readFields(req, new URL('http://127.0.0.1/'));
  if (action === 'abort') {
    await provider.interactionFinished(req, res, {
      error: 'access_denied', error_description: 'End-User aborted interaction',
    }, { mergeWithLastSubmission: false });
    return;
  }
  const account = personFor(fields.username);
  // Check a password even for an unknown name, so both answers take the same time.
  const ok = passwordMatches(account ?? 'no-such-account', fields.password) && account !== undefined;
  if (!ok) {
    loginPage(res, {
      uid,
      clientId: params.client_id,
      username: typeof fields.username === 'string' ? fields.username : '',
      error: 'Wrong user name or password.',
    });
    return;
  }
  await provider.interactionFinished(req, res, {
    login: { accountId: account, amr: [...(PEOPLE[account].amr ?? DEFAULT_AMR)], remember: true },
  }, { mergeWithLastSubmission: false });
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
  if (url.pathname === '/__clients') {
    if (req.method !== 'POST') {
      req.resume();
      sendJson(res, 405, { error: 'method_not_allowed' }, { Allow: 'POST' });
      return;
    }
    if (!provider) {
      req.resume();
      sendJson(res, 503, { error: 'starting' });
      return;
    }
    readFields(req, url)
      .then((fields) => registerClient(fields))
      .then(([status, body]) => sendJson(res, status, body))
      .catch((err) => {
        sendJson(res, 400, { error: 'invalid_request', error_description: String(err?.message ?? err) });
      });
    return;
  }
  const interactionMatch = INTERACTION_PATH.exec(url.pathname);
  if (interactionMatch && provider) {
    interaction(req, res, url, interactionMatch[1], interactionMatch[2]).catch((err) => {
      process.stderr.write(`idp: ${url.pathname} failed: ${err?.stack ?? err}\n`);
      if (!res.headersSent) sendJson(res, 500, { error: 'server_error' });
      else res.destroy();
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
  (async () => {
    for (const fields of cliClients) {
      // eslint-disable-next-line no-await-in-loop
      const [status, body] = await registerClient(fields);
      if (status !== 200) {
        process.stderr.write(`idp: --client ${fields.client_id}: ${body.error_description ?? body.error}\n`);
        process.exit(2);
      }
    }
    process.stdout.write(`READY ${issuer}\n`);
  })().catch((err) => {
    process.stderr.write(`idp: provider setup failed: ${err?.stack ?? err}\n`);
    process.exit(1);
  });
});
