// A real OpenID Connect provider (panva/oidc-provider) for the broker's tests, on loopback only.
//
// Environment:
//   IDP_CERT, IDP_KEY      PEM files of its TLS server certificate (a test CA the broker trusts)
//   IDP_REDIRECT_URI       the broker's callback, the one registered redirect URI
//   IDP_CLIENT_ID, IDP_CLIENT_SECRET
//   IDP_GROUPS             JSON: {"alice": ["eng"], ...}; the `groups` claim of each login
//   IDP_GROUPS_FILE        a file holding the same JSON, read again each time claims are issued
//                          (sign-in and every refresh), so a test can remove a group mid-session;
//                          when set, it wins over IDP_GROUPS
//   IDP_ID_TOKEN_TTL       ID token lifetime in seconds (default 300)
//
// It listens on 127.0.0.1 on a free port and prints one line, {"issuer": "https://127.0.0.1:PORT"},
// on standard output once it serves. Sign-in uses the provider's development interactions: any
// login name, any password; consent is pre-granted for the one (first-party) client.
//
// Refresh tokens: the client may use the refresh_token grant, and gets a refresh token with every
// code and device code it redeems (an enterprise provider's policy for a first-party client; with
// oidc-provider's default, the code flow would need prompt=consent to keep offline_access). Every
// refresh rotates the refresh token (the old one is then refused), so a client that does not keep
// the rotated one fails its next refresh.
import https from 'node:https';
import { readFileSync } from 'node:fs';
import Provider from 'oidc-provider';

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};

const fixedGroups = JSON.parse(process.env.IDP_GROUPS || '{}');
const groupsOf = (id) => {
  const file = process.env.IDP_GROUPS_FILE;
  const groups = file ? JSON.parse(readFileSync(file, 'utf8')) : fixedGroups;
  return groups[id] || [];
};
const server = https.createServer({ cert: readFileSync(env('IDP_CERT')), key: readFileSync(env('IDP_KEY')) });

server.listen(0, '127.0.0.1', () => {
  const issuer = `https://127.0.0.1:${server.address().port}`;
  const provider = new Provider(issuer, {
    clients: [{
      client_id: env('IDP_CLIENT_ID'),
      client_secret: env('IDP_CLIENT_SECRET'),
      redirect_uris: [env('IDP_REDIRECT_URI')],
      grant_types: ['authorization_code', 'urn:ietf:params:oauth:grant-type:device_code', 'refresh_token'],
      response_types: ['code'],
      token_endpoint_auth_method: 'client_secret_basic',
    }],
    pkce: { required: () => true },
    scopes: ['openid', 'email', 'groups', 'offline_access'],
    claims: { openid: ['sub'], email: ['email', 'email_verified'], groups: ['groups'] },
    // The broker reads the claims from the ID token; it never calls userinfo.
    conformIdTokenClaims: false,
    features: { devInteractions: { enabled: true }, deviceFlow: { enabled: true } },
    ttl: { IdToken: Number(process.env.IDP_ID_TOKEN_TTL || 300) },
    async issueRefreshToken(ctx, client) {
      return client.clientId === env('IDP_CLIENT_ID') && client.grantTypeAllowed('refresh_token');
    },
    rotateRefreshToken: true,
    cookies: { keys: ['moat-broker-test-only-cookie-key'] },
    async findAccount(ctx, id) {
      return {
        accountId: id,
        async claims() {
          return { sub: id, email: `${id}@example.test`, email_verified: true, groups: groupsOf(id) };
        },
      };
    },
    // First-party client: consent is granted without asking (oidc-provider's documented recipe).
    async loadExistingGrant(ctx) {
      const grantId = ctx.oidc.result?.consent?.grantId || ctx.oidc.session.grantIdFor(ctx.oidc.client.clientId);
      if (grantId) return ctx.oidc.provider.Grant.find(grantId);
      const grant = new ctx.oidc.provider.Grant({ clientId: ctx.oidc.client.clientId, accountId: ctx.oidc.session.accountId });
      grant.addOIDCScope('openid email groups offline_access');
      await grant.save();
      return grant;
    },
  });
  server.on('request', provider.callback());
  process.stdout.write(`${JSON.stringify({ issuer })}\n`);
});

// The test closes our stdin when it is done (or dies): exit then, so no provider outlives a test.
process.stdin.on('end', () => process.exit(0));
process.stdin.resume();
