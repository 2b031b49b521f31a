// A real OpenID Connect provider for the end-to-end scenario: the `oidc-provider` package with
// its development login form (any password), on 127.0.0.1. Its users carry portal roles the way
// Entra ID app roles do (the `roles` claim) or through a group that the portal maps to TeamLead.
import http from 'node:http';
import Provider from 'oidc-provider';

/** The users of the scenario, by login. */
export const USERS = {
  alice: { name: 'Alice Admin', roles: ['Admin'], groups: [] },
  audrey: { name: 'Audrey Auditor', roles: ['Auditor'], groups: [] },
  lee: { name: 'Lee Lead', roles: [], groups: ['9b2f5c1e-1111-4222-8333-444455556666'] },
  nobody: { name: 'No Role', roles: [], groups: [] },
};

/** The group whose members the portal makes team leads (`--group-roles`). */
export const LEADS_GROUP = USERS.lee.groups[0];

/**
 * Starts the provider on `port` (0: any free port) for one client, and returns its issuer URL
 * and a function that stops it.
 */
export async function startProvider({ port = 0, clientId, clientSecret, redirectUri }) {
  const server = http.createServer();
  await new Promise((resolve) => server.listen(port, '127.0.0.1', resolve));
  const issuer = `http://127.0.0.1:${server.address().port}`;
  const provider = new Provider(issuer, {
    clients: [{
      client_id: clientId,
      client_secret: clientSecret,
      redirect_uris: [redirectUri],
      grant_types: ['authorization_code'],
      response_types: ['code'],
      token_endpoint_auth_method: 'client_secret_basic',
      id_token_signed_response_alg: 'RS256',
    }],
    claims: { openid: ['sub'], profile: ['name', 'roles', 'groups'], email: ['email'] },
    // The portal reads roles and groups from the ID token, as Entra ID puts them there.
    conformIdTokenClaims: false,
    pkce: { required: () => true },
    async findAccount(ctx, id) {
      const user = USERS[id];
      if (!user) return undefined;
      return {
        accountId: id,
        async claims() {
          return { sub: id, name: user.name, roles: user.roles, groups: user.groups };
        },
      };
    },
  });
  server.on('request', provider.callback());
  return {
    issuer,
    stop: () => new Promise((resolve) => {
      server.close(resolve);
      server.closeAllConnections();
    }),
  };
}
