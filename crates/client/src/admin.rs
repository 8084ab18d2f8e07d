//! The admin calls a bank's back end makes with its admin key.

use serde::{Deserialize, Serialize};

use crate::{error, Client, DeviceIdentity, Result, Tokens};

/// The admin API with one key.
#[derive(Clone)]
pub struct Admin {
    client: Client,
    key: String,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Admin")
            .field("client", &self.client)
            .finish_non_exhaustive()
    }
}

/// A user named by the integrator's own id (`POST /v1/admin/users`).
#[derive(Debug, Clone, Deserialize)]
pub struct ExternalUser {
    /// BlockRemote's user id.
    pub user_id: String,
    /// The integrator's id.
    pub external_id: String,
    /// True when this call created the user.
    pub created: bool,
}

/// Whose session `POST /v1/admin/sessions` opens.
#[derive(Debug, Clone)]
pub enum SessionRequest<'a> {
    /// A user by BlockRemote's id.
    User(&'a str),
    /// A user by the integrator's id; `create` makes it on first use.
    External {
        /// The integrator's id.
        external_id: &'a str,
        /// Create the user when it does not exist yet.
        create: bool,
    },
}

/// A page of `GET /v1/admin/users`.
#[derive(Debug, Clone, Deserialize)]
pub struct UserPage {
    /// The users, oldest first.
    pub items: Vec<ExternalUser>,
    /// The cursor of the next page, if any.
    pub next_cursor: Option<String>,
}

impl Admin {
    pub(crate) fn new(client: Client, key: &str) -> Self {
        Self {
            client,
            key: key.to_owned(),
        }
    }

    /// The server this key talks to.
    pub fn client(&self) -> &Client {
        &self.client
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client.bearer(method, path, &self.key)
    }

    /// `POST /v1/admin/users`: the user of `external_id`, created on first use.
    pub async fn ensure_user(
        &self,
        external_id: &str,
        email: Option<&str>,
    ) -> Result<ExternalUser> {
        let mut body = serde_json::json!({ "external_id": external_id });
        if let Some(email) = email {
            body["email"] = email.into();
        }
        let r = self
            .request(reqwest::Method::POST, "/v1/admin/users")
            .json(&body)
            .send()
            .await?;
        error::json(r).await
    }

    /// `GET /v1/admin/users?external_id_prefix=…`: one page of the users
    /// whose external id starts with `prefix`.
    pub async fn users(&self, prefix: &str, cursor: Option<&str>, limit: u32) -> Result<UserPage> {
        let mut query = vec![
            ("external_id_prefix", prefix.to_owned()),
            ("limit", limit.to_string()),
        ];
        if let Some(cursor) = cursor {
            query.push(("cursor", cursor.to_owned()));
        }
        let r = self
            .request(reqwest::Method::GET, "/v1/admin/users")
            .query(&query)
            .send()
            .await?;
        error::json(r).await
    }

    /// `DELETE /v1/admin/users/{user_id}`: the user, its devices and their
    /// sessions (audit rows stay).
    pub async fn delete_user(&self, user_id: &str) -> Result<()> {
        let r = self
            .request(
                reqwest::Method::DELETE,
                &format!("/v1/admin/users/{user_id}"),
            )
            .send()
            .await?;
        error::empty(r).await
    }

    /// `POST /v1/admin/sessions`: a device session for a user the caller
    /// authenticated itself.
    pub async fn session(
        &self,
        who: SessionRequest<'_>,
        device: &DeviceIdentity,
    ) -> Result<Tokens> {
        #[derive(Serialize)]
        struct Body<'a> {
            #[serde(skip_serializing_if = "Option::is_none")]
            user_id: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            external_user_id: Option<&'a str>,
            #[serde(skip_serializing_if = "std::ops::Not::not")]
            create: bool,
            #[serde(flatten)]
            device: &'a DeviceIdentity,
        }
        let body = match who {
            SessionRequest::User(id) => Body {
                user_id: Some(id),
                external_user_id: None,
                create: false,
                device,
            },
            SessionRequest::External {
                external_id,
                create,
            } => Body {
                user_id: None,
                external_user_id: Some(external_id),
                create,
                device,
            },
        };
        let r = self
            .request(reqwest::Method::POST, "/v1/admin/sessions")
            .json(&body)
            .send()
            .await?;
        error::json(r).await
    }

    /// `POST /v1/admin/devices/{id}/lock` with `action` (`CRITICAL_LOCK`,
    /// `IMMEDIATE_QUARANTINE` or `FORCE_OVERLAY`) and a reason code.
    pub async fn lock(
        &self,
        device_id: &str,
        action: &str,
        reason: &str,
    ) -> Result<serde_json::Value> {
        let r = self
            .request(
                reqwest::Method::POST,
                &format!("/v1/admin/devices/{device_id}/lock"),
            )
            .json(&serde_json::json!({"action": action, "reason": reason}))
            .send()
            .await?;
        error::json(r).await
    }

    /// `POST /v1/admin/devices/{id}/unlock` with a reason code.
    pub async fn unlock(&self, device_id: &str, reason: &str) -> Result<serde_json::Value> {
        let r = self
            .request(
                reqwest::Method::POST,
                &format!("/v1/admin/devices/{device_id}/unlock"),
            )
            .json(&serde_json::json!({"reason": reason}))
            .send()
            .await?;
        error::json(r).await
    }

    /// `GET /v1/admin/devices/{id}`: status, holds, trust, last command.
    pub async fn device(&self, device_id: &str) -> Result<serde_json::Value> {
        let r = self
            .request(
                reqwest::Method::GET,
                &format!("/v1/admin/devices/{device_id}"),
            )
            .send()
            .await?;
        error::json(r).await
    }
}
