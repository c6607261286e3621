//! Agent identities: issue, rotate and revoke tokens, durable first.

use super::*;

fn no_identity(name: &AgentName) -> Error {
    Error::InvalidRequest(format!("{name} has no identity"))
}

impl Broker {
    /// Creates an identity and returns it with its token (shown once; only
    /// its hash is stored). Resolves once the identity is durable.
    pub async fn add_identity(&self, spec: IdentitySpec) -> Result<(Identity, String)> {
        let (identity, token) = spec.issue()?;
        if self.trust.identity(&identity.name).is_some() {
            return Err(Error::InvalidRequest(format!(
                "{} already has an identity (rotate or revoke it)",
                identity.name
            )));
        }
        self.store_identity(&identity.name.clone(), Some(identity.clone()))
            .await?;
        Ok((identity, token))
    }

    /// Issues a new token for `name`; the old one stops working and the
    /// agent's open connections are closed.
    pub async fn rotate_identity(&self, name: &AgentName) -> Result<(Identity, String)> {
        let mut identity = self.trust.identity(name).ok_or_else(|| no_identity(name))?;
        let (token, hash) = auth::new_token();
        identity.token_hash = hash;
        self.store_identity(name, Some(identity.clone())).await?;
        Ok((identity, token))
    }

    /// Deletes `name`'s identity and closes its open connections.
    pub async fn revoke_identity(&self, name: &AgentName) -> Result<Identity> {
        let identity = self.trust.identity(name).ok_or_else(|| no_identity(name))?;
        self.store_identity(name, None).await?;
        Ok(identity)
    }

    async fn store_identity(&self, name: &AgentName, identity: Option<Identity>) -> Result<()> {
        // Durable first: a token is never printed for an identity a crash
        // would forget, and a revoked one never comes back. Trust takes it
        // (and the agent's sessions are closed) as the feed reports it,
        // before this resolves — on every node alike.
        self.engine.set_identity(name.clone(), identity).await
    }
}
