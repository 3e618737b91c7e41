//! Guest images: the `images` table.

use super::{from_micros, is_unique_violation, parse_col, to_micros, Store};
use crate::error::{Error, Result};
use crate::model::{Image, ImageId, KernelBoot};
use chrono::Utc;
use sqlx::any::AnyRow;
use sqlx::Row;

fn from_row(row: &AnyRow) -> Result<Image> {
    let boot: Option<String> = row.try_get("boot")?;
    Ok(Image {
        id: parse_col(&row.try_get::<String, _>("id")?, "images.id")?,
        name: row.try_get("name")?,
        source: row.try_get("source")?,
        format: row.try_get("format")?,
        sha256: row.try_get("sha256")?,
        boot: boot
            .map(|b| serde_json::from_str(&b))
            .transpose()
            .map_err(|e| Error::Internal(format!("bad images.boot: {e}")))?,
        deprecated_at: row
            .try_get::<Option<i64>, _>("deprecated_at")?
            .map(from_micros),
        created_at: from_micros(row.try_get("created_at")?),
    })
}

const COLUMNS: &str = "id, name, source, format, sha256, boot, deprecated_at, created_at";

impl Store {
    /// Registers an image; 409 when the name is taken.
    pub async fn image_create(
        &self,
        name: &str,
        source: &str,
        format: &str,
        sha256: Option<&str>,
        boot: Option<&KernelBoot>,
    ) -> Result<Image> {
        let id = ImageId::new();
        let res = sqlx::query(
            "INSERT INTO images (id, name, source, format, sha256, boot, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(id.to_string())
        .bind(name)
        .bind(source)
        .bind(format)
        .bind(sha256)
        .bind(boot.map(|b| serde_json::to_string(b).unwrap_or_default()))
        .bind(to_micros(Utc::now()))
        .execute(&self.write)
        .await;
        match res {
            Err(e) if is_unique_violation(&e) => {
                return Err(Error::Conflict(format!(
                    "an image named '{name}' already exists"
                )))
            }
            other => {
                other?;
            }
        }
        self.image_by_name(name)
            .await?
            .ok_or(Error::NotFound("image"))
    }

    pub async fn image_by_name(&self, name: &str) -> Result<Option<Image>> {
        let sql = format!("SELECT {COLUMNS} FROM images WHERE name = $1");
        let row = sqlx::query(&sql)
            .bind(name)
            .fetch_optional(&self.read)
            .await?;
        row.as_ref().map(from_row).transpose()
    }

    /// Every image, by name. Catalogues stay small, so there is no paging.
    pub async fn image_list(&self) -> Result<Vec<Image>> {
        let sql = format!("SELECT {COLUMNS} FROM images ORDER BY name");
        let rows = sqlx::query(&sql).fetch_all(&self.read).await?;
        rows.iter().map(from_row).collect()
    }

    /// Deprecates (or restores) an image; `None` when there is no such image. Deprecating
    /// again keeps the first time.
    pub async fn image_set_deprecated(
        &self,
        id: ImageId,
        deprecated: bool,
    ) -> Result<Option<Image>> {
        let sql = if deprecated {
            "UPDATE images SET deprecated_at = COALESCE(deprecated_at, $2) WHERE id = $1"
        } else {
            "UPDATE images SET deprecated_at = NULL WHERE id = $1 AND $2 = $2"
        };
        let res = sqlx::query(sql)
            .bind(id.to_string())
            .bind(to_micros(Utc::now()))
            .execute(&self.write)
            .await?;
        if res.rows_affected() == 0 {
            return Ok(None);
        }
        let sql = format!("SELECT {COLUMNS} FROM images WHERE id = $1");
        let row = sqlx::query(&sql)
            .bind(id.to_string())
            .fetch_one(&self.write)
            .await?;
        from_row(&row).map(Some)
    }
}
