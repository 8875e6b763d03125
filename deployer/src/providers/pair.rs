//! Two providers planned and applied as one (a target and its DNS provider).

use stack::{DesiredGraph, Resource};

use crate::engine::provider::{Inventory, KindSpec, Observed, Provider, ProviderError, StepCtx};

/// `first` and `second` as one provider: each kind goes to the one that declares it.
pub struct Pair<'a, A, B> {
    first: &'a A,
    second: &'a B,
    kinds: Vec<KindSpec>,
}

impl<'a, A: Provider, B: Provider> Pair<'a, A, B> {
    /// Join two providers whose kinds do not overlap.
    pub fn new(first: &'a A, second: &'a B) -> Self {
        let kinds = first
            .kinds()
            .iter()
            .chain(second.kinds())
            .cloned()
            .collect();
        Pair {
            first,
            second,
            kinds,
        }
    }

    fn in_first(&self, kind: &str) -> bool {
        self.first.kind_spec(kind).is_some()
    }
}

impl<A: Provider, B: Provider> Provider for Pair<'_, A, B> {
    fn kinds(&self) -> &[KindSpec] {
        &self.kinds
    }

    async fn prepare(&self, graph: &mut DesiredGraph) -> Result<(), ProviderError> {
        self.first.prepare(graph).await?;
        self.second.prepare(graph).await
    }

    async fn observe(&self) -> Result<Inventory, ProviderError> {
        let (mut a, b) = futures::try_join!(self.first.observe(), self.second.observe())?;
        a.extend(b);
        Ok(a)
    }

    async fn create(&self, ctx: &StepCtx, desired: &Resource) -> Result<Observed, ProviderError> {
        if self.in_first(&desired.kind) {
            self.first.create(ctx, desired).await
        } else {
            self.second.create(ctx, desired).await
        }
    }

    async fn update(
        &self,
        ctx: &StepCtx,
        desired: &Resource,
        current: &Observed,
        changed: &[String],
    ) -> Result<Observed, ProviderError> {
        if self.in_first(&desired.kind) {
            self.first.update(ctx, desired, current, changed).await
        } else {
            self.second.update(ctx, desired, current, changed).await
        }
    }

    async fn delete(&self, ctx: &StepCtx, current: &Observed) -> Result<(), ProviderError> {
        if self.in_first(&current.kind) {
            self.first.delete(ctx, current).await
        } else {
            self.second.delete(ctx, current).await
        }
    }
}
